"""Generation throughput: `transformers.generate` against posttrain's local rollout engine.

BENCHMARK.md's condition: the random-init `small` model (fp32, 2 threads), 64 arith prompts
("What is a∘b?" after 0-6 solved few-shot lines, in the chat template), 32 new tokens, temperature 1.
A random-init model rarely emits EOS, so every row generates all 32 tokens.

Both run in this one process, interleaved (HF, engine, HF, engine, ...) after a warm-up each, so a
load change on the shared machine hits both alike; the ratio of the medians is the result, and the
per-repetition ratios give its spread. Appends one JSON line to benchmarks/results/generate.jsonl.

    python -m benchmarks.generate [--reps 7] [--no-save]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from benchmarks.common import cpu_model
from posttrain.config import ModelConfig
from posttrain.data.arith import few_shot_prompt, sample_problem
from posttrain.data.corpus import plain_text, synthetic_documents
from posttrain.models import build_model, train_tokenizer
from posttrain.models.onednn import use_torch_linears
from posttrain.models.precision import autocast
from posttrain.rollout import LocalRolloutEngine, SamplingParams
from posttrain.rollout.forward import left_pad

RESULTS = Path(__file__).parent / "results" / "generate.jsonl"


def arith_chat_prompts(tokenizer: transformers.PreTrainedTokenizerBase, count: int, seed: int = 0) -> list[list[int]]:
    """`count` few-shot arith prompts rendered with the chat template's generation prompt."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        text = few_shot_prompt(sample_problem(rng, "train"), rng)
        prompts.append(list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, return_dict=False)))
    return prompts


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """(seconds, generated tokens) of one call."""
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def in_precision(fn: Callable[[], int], precision: str) -> Callable[[], int]:
    def run() -> int:
        with autocast(precision):
            return fn()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions of each, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: every contender under bf16 autocast (the engine packs bf16 weights itself)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    documents = itertools.islice(synthetic_documents(seed=0), 3000)
    tokenizer = train_tokenizer((plain_text(d) for d in documents), vocab_size=1024)
    model = build_model(ModelConfig(size=args.size), tokenizer, seed=0).eval()
    # transformers.generate as transformers ships it (torch's GEMM, its sdpa attention: `run_hf`); the engine packs
    # oneDNN weights itself.
    use_torch_linears(model)
    prompts = arith_chat_prompts(tokenizer, args.batch)
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
    engine = LocalRolloutEngine(model, tokenizer)
    hf_engine = LocalRolloutEngine(model, tokenizer, forward="hf")
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)

    # Generated tokens = rows x decoding steps: both compute every row at every step, finished or not.
    def run_hf() -> int:
        # transformers' own attention too: build_model switched the model to posttrain's CPU attention, which the
        # engines keep (under bf16 it picks an fp32 path that was ~15% faster than transformers' sdpa here).
        chosen = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens)
        finally:
            model.set_attn_implementation(chosen)
        return out.numel() - input_ids.numel()

    def run_engine(which: LocalRolloutEngine) -> Callable[[], int]:
        return lambda: which.generate(prompts, params).completion_ids.numel()

    load_before = os.getloadavg()[0]
    mkl_engine = LocalRolloutEngine(model, tokenizer, onednn=False)  # attributes the oneDNN GEMMs' share
    contenders = {"hf_generate": run_hf, "engine": run_engine(engine), "engine_mkl_gemm": run_engine(mkl_engine),
                  "engine_hf_forward": run_engine(hf_engine)}
    contenders = {name: in_precision(fn, args.precision) for name, fn in contenders.items()}
    for fn in contenders.values():  # warm-up: allocator, thread pools, first-call paths
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    tokens: dict[str, list[int]] = {name: [] for name in contenders}
    for rep in range(args.reps):
        for name, fn in contenders.items():
            torch.manual_seed(rep)
            seconds, count = timed(fn)
            times[name].append(seconds)
            tokens[name].append(count)

    rates = {name: [n / s for n, s in zip(tokens[name], times[name], strict=True)] for name in contenders}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    paired = [e / h for e, h in zip(rates["engine"], rates["hf_generate"], strict=True)]
    for name in contenders:
        print(f"{name:18s} median {medians[name]:7.0f} new tok/s   "
              f"(min {min(rates[name]):.0f}, max {max(rates[name]):.0f}; {statistics.median(times[name]):.2f} s/call)")
    ratio = medians["engine"] / medians["hf_generate"]
    print(f"engine / hf_generate: {ratio:.2f}x (per-repetition ratios {min(paired):.2f}-{max(paired):.2f}, "
          f"median {statistics.median(paired):.2f})")

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_model(), "precision": args.precision,
        "size": args.size, "batch": args.batch, "new_tokens": args.new_tokens, "reps": args.reps,
        "prompt_tokens": sum(len(p) for p in prompts), "padded_prompt_tokens": input_ids.numel(),
        "new_tok_per_s": {name: round(m, 1) for name, m in medians.items()},
        "new_tok_per_s_all": {name: [round(r, 1) for r in rs] for name, rs in rates.items()},
        # The machine is shared: the load and OpenMP's wait policy (spinning threads collapse under
        # contention; OMP_WAIT_POLICY=PASSIVE degrades gracefully) say how far to trust the numbers.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "ratio_engine_vs_hf": round(ratio, 3), "paired_ratio_range": [round(min(paired), 3), round(max(paired), 3)],
    }
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
