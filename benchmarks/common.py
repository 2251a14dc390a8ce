"""Shared benchmark plumbing: the models and data of BENCHMARK.md, timing, MFU, RSS, result files.

Each workload runs in its own subprocess (so its peak RSS is its own), posttrain and TRL one after
the other from the same harness invocation, on the same model files and data.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).parent
CACHE = ROOT / ".cache"
RESULTS = ROOT / "results"
PEAK_FLOPS = 188e9  # measured fp32 matmul peak of 2 Zen3 threads (BENCHMARK.md)
WARMUP_STEPS = 2


def model_dir(size: str) -> Path:
    """A random-init (seed 0) fp32 Llama of `size` with the project tokenizer, built once and cached."""
    from posttrain.config import ModelConfig
    from posttrain.data.corpus import plain_text, synthetic_documents
    from posttrain.models import build_model, save_pretrained, train_tokenizer

    out = CACHE / f"model-{size}"
    if (out / "model.safetensors").is_file():
        return out
    documents = itertools.islice(synthetic_documents(seed=0), 20_000)
    tokenizer = train_tokenizer((plain_text(d) for d in documents), vocab_size=1024)
    save_pretrained(build_model(ModelConfig(size=size), tokenizer, seed=0), tokenizer, out)
    return out


def arith_rows(n: int = 4096, seed: int = 0) -> list[dict[str, Any]]:
    """BENCHMARK.md's data: 'What is a∘b?' after 0-6 solved few-shot lines, plain prompt/completion."""
    from posttrain.data.arith import few_shot_prompt, sample_problem

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = sample_problem(rng, "train")
        rows.append({"prompt": few_shot_prompt(problem, rng), "completion": f" {problem.answer}",
                     "answer": str(problem.answer)})
    return rows


def non_embedding_parameters(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StepClock:
    """Wall time between optimizer steps and the trained tokens of each step."""

    marks: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.marks = [time.perf_counter()]

    def step(self, trained_tokens: int) -> None:
        self.marks.append(time.perf_counter())
        self.tokens.append(trained_tokens)

    def summary(self, non_embedding_params: int) -> dict[str, float]:
        durations = [b - a for a, b in itertools.pairwise(self.marks)][WARMUP_STEPS:]
        tokens = self.tokens[WARMUP_STEPS:]
        if not durations:
            raise ValueError("not enough steps to measure after warm-up")
        tok_per_s = sum(tokens) / sum(durations)
        return {"s_per_step": statistics.mean(durations), "s_per_step_median": statistics.median(durations),
                "trained_tok_per_s": tok_per_s, "mfu": 6 * non_embedding_params * tok_per_s / PEAK_FLOPS,
                "tokens_per_step": statistics.mean(tokens), "measured_steps": len(durations),
                "peak_rss_mb": peak_rss_mb()}


def environment() -> dict[str, Any]:
    import transformers

    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def run_worker(module: str, args: list[str]) -> dict[str, Any]:
    """Run `python -m <module> --worker <args>` and return the JSON object it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def append_result(name: str, record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({**environment(), **record}) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], keys: list[str]) -> None:
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(_fmt(row.get(k)).ljust(widths[k]) for k in keys))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)
