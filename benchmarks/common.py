"""Shared benchmark plumbing: the models and data of BENCHMARK.md, timing, MFU, RSS, result files.

Each workload runs in its own subprocess (so its peak RSS is its own), posttrain and TRL one after
the other from the same harness invocation, on the same model files and data.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import math
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
WARMUP_STEPS = 2
# A harness's --precision reaches its workers (subprocesses) through the environment, with the physical limit
# of that precision measured on this machine by the harness (`use_precision`); 188 GFLOP/s was MKL's fp32
# sgemm peak on the first benchmark machine (BENCHMARK.md), kept only as the fallback of a bare worker.
PRECISION = os.environ.get("BENCH_PRECISION", "fp32")
PEAK_FLOPS = float(os.environ.get("BENCH_PEAK_GFLOPS", "188")) * 1e9
PRECISIONS = ("fp32", "bf16")
LIBRARIES = ("posttrain", "trl")


def add_precision_argument(parser: Any) -> None:
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="both libraries in this precision: posttrain's train.precision, TRL's bf16=True")


def add_allocator_arguments(parser: Any) -> None:
    parser.add_argument("--preload", default=None, metavar="LIB",
                        help="a malloc LD_PRELOADed into the workers of --preload-for, e.g. "
                             "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (README's documented option for a "
                             "lower peak RSS); every row records its allocator")
    parser.add_argument("--preload-for", default="posttrain,trl", help="the libraries whose workers get --preload")


def use_allocator(preload: str | None, libraries: str) -> None:
    """The workers of `libraries` (comma-separated) run with `preload` as LD_PRELOAD (`run_worker`)."""
    if preload is None:
        return
    if not Path(preload).is_file():
        raise SystemExit(f"--preload {preload}: no such file (Debian: apt install libtcmalloc-minimal4)")
    os.environ["BENCH_PRELOAD"], os.environ["BENCH_PRELOAD_FOR"] = preload, libraries
    print(f"allocator: {preload} for {libraries}", flush=True)


def allocator() -> str:
    """The malloc this process runs on: a preloaded library's file name, or glibc's."""
    return Path(os.environ["LD_PRELOAD"]).name if os.environ.get("LD_PRELOAD") else "glibc"


def use_precision(precision: str) -> float:
    """Run the workers in `precision` and measure its physical limit here (GFLOP/s of the model-shaped
    GEMMs, the fastest library for fp32: `benchmarks.peak`), which their MFU is computed against. Measured once per
    precision and invocation: a harness that runs workers in two precisions (`worker_specs`) switches between them."""
    gflops = _peak_gflops(precision)
    os.environ["BENCH_PRECISION"], os.environ["BENCH_PEAK_GFLOPS"] = precision, f"{gflops:.1f}"
    return gflops


@functools.cache
def _peak_gflops(precision: str) -> float:
    from benchmarks.peak import gpu_matmul_peak, model_shaped_peak

    if torch.cuda.is_available():  # posttrain's models go to the GPU (models.device), TRL's too (accelerate)
        gflops, where = gpu_matmul_peak(precision), f"8192^3 matmul on {torch.cuda.get_device_name()}"
    else:
        gflops, where = model_shaped_peak(precision), "model-shaped GEMM on 2 threads"
    print(f"precision {precision}: peak {gflops:.0f} GFLOP/s ({where})", flush=True)
    return gflops


def worker_specs(libraries: str, precision: str) -> list[tuple[str, str]]:
    """`--libraries` as (library, precision) runs: `posttrain,trl` runs both in the harness's --precision,
    `posttrain:bf16,trl:fp32` names each run's own (GRPO's bf16 target is against TRL in fp32)."""
    specs = []
    for spec in libraries.split(","):
        library, named, own = spec.partition(":")
        if library not in LIBRARIES or (named and own not in PRECISIONS):
            raise SystemExit(f"--libraries: {spec!r} is not LIBRARY[:PRECISION] with LIBRARY one of "
                             f"{', '.join(LIBRARIES)} and PRECISION one of {', '.join(PRECISIONS)}")
        specs.append((library, own or precision))
    return specs


def model_dir(size: str) -> Path:
    """A random-init (seed 0) fp32 Llama of `size` with the project tokenizer, built once and cached.

    posttrain is imported only to build it: a TRL worker must not import posttrain, whose import
    settles process-wide oneDNN settings (see posttrain.models.onednn)."""
    out = CACHE / f"model-{size}"
    if (out / "model.safetensors").is_file():
        return out
    from posttrain.config import ModelConfig
    from posttrain.data.corpus import plain_text, synthetic_documents
    from posttrain.models import build_model, save_pretrained, train_tokenizer

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


def arith_pairs(n: int = 4096, seed: int = 0) -> list[dict[str, Any]]:
    """BENCHMARK.md's preference pairs: the rows of `arith_rows`, chosen = the correct answer, rejected = a
    wrong one (off by one or by ten)."""
    rng = random.Random(seed + 1)
    pairs = []
    for row in arith_rows(n, seed):
        wrong = int(row["answer"]) + rng.choice((-10, -1, 1, 10))
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": f" {wrong}"})
    return pairs


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

    def summary(self, non_embedding_params: int, mfu: bool = True) -> dict[str, float | None]:
        """Step times after the warm-up and their tokens; MFU as 6 N FLOPs per trained token, which holds for a
        training step alone: an RL step (`mfu=False`: None) also generates (2 N per token, from a KV cache) and
        with shared prompts computes a group's prompt once, so 6 N x its tokens counted the work of neither side
        (posttrain's GRPO "MFU" was twice its FLOPs)."""
        durations = [b - a for a, b in itertools.pairwise(self.marks)][WARMUP_STEPS:]
        tokens = self.tokens[WARMUP_STEPS:]
        if not durations:
            raise ValueError("not enough steps to measure after warm-up")
        tok_per_s = sum(tokens) / sum(durations)
        return {"s_per_step": statistics.mean(durations), "s_per_step_median": statistics.median(durations),
                "trained_tok_per_s": tok_per_s,
                "mfu": 6 * non_embedding_params * tok_per_s / PEAK_FLOPS if mfu else None,
                "precision": PRECISION, "peak_gflops": PEAK_FLOPS / 1e9,
                "tokens_per_step": statistics.mean(tokens), "measured_steps": len(durations),
                "peak_rss_mb": peak_rss_mb(), "allocator": allocator(), **gpu_attention()}


def gpu_attention() -> dict[str, bool]:
    """On a GPU, whether this process's attention could use cuDNN's backend (posttrain turns it off:
    `models.device.settle_gpu_attention`); nothing on the CPU."""
    return {"cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled()} if torch.cuda.is_available() else {}


@contextlib.contextmanager
def profiled(name: str):
    """Under `BENCH_PROFILE=<folder>`, torch's profiler over the block, its tables of the most costly operations
    (host time, then device time) written to <folder>/<name>.txt; else nothing."""
    folder = os.environ.get("BENCH_PROFILE")
    if not folder:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    table = prof.key_averages()
    text = table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    if torch.cuda.is_available():
        text += "\n" + table.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.txt").write_text(text)


class TimedSource:
    """Wraps a posttrain StepSource: marks the clock each time the Trainer asks for the next step
    (= the previous step ended)."""

    def __init__(self, source: Any, clock: StepClock) -> None:
        self.source, self.clock, self._pending = source, clock, None

    def next_step(self):
        if self._pending is not None:
            self.clock.step(self._pending)
        batch = self.source.next_step()
        self._pending = batch.tokens
        return batch

    def finish(self) -> None:
        if self._pending is not None:
            self.clock.step(self._pending)
            self._pending = None

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


# The settings of BENCHMARK.md every TRL workload shares; bf16=True (autocast) in a --precision bf16 run.
TRL_ARGS = {"lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "bf16": PRECISION == "bf16", "fp16": False, "use_cpu": not torch.cuda.is_available(),
            "gradient_checkpointing": False,
            "logging_steps": 10_000,
            "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "seed": 0,
            "dataloader_num_workers": 0}


def trl_clock(model: torch.nn.Module) -> tuple[StepClock, Any]:
    """A StepClock and the transformers TrainerCallback that drives it; the trained tokens are the
    non-pad tokens of `model`'s forwards with grad (reference or eval forwards are not counted)."""
    from transformers import TrainerCallback

    clock = StepClock()
    tokens = {"n": 0}

    def count_tokens(module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens["n"] += int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel())

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step(tokens["n"])
            tokens["n"] = 0

    return clock, Clock()


def environment() -> dict[str, Any]:
    import transformers

    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's name, family/model and the instruction sets that decide fp32 and bf16 GEMM speed (BENCHMARK.md:
    ratios differ between CPUs, so every row records its CPU)."""
    from posttrain.models.precision import cpu_flags, cpu_info

    fields = cpu_info()
    if not fields:
        return platform.processor() or "unknown"
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    name, family, model = (fields.get(key, "?") for key in ("model name", "cpu family", "model"))
    return f"{name} (family {family} model {model}; {' '.join(wanted)})"


def run_worker(module: str, args: list[str]) -> dict[str, Any]:
    """Run `python -m <module> --worker <args>` and return the JSON object it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    library = args[args.index("--library") + 1] if "--library" in args else None
    if "BENCH_PRELOAD" in env and library in env["BENCH_PRELOAD_FOR"].split(","):
        env["LD_PRELOAD"] = env["BENCH_PRELOAD"]
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


def record_run(rows: list[dict[str, Any]], name: str, size: str, row: dict[str, Any]) -> None:
    """Keep one worker's row for the table, append it to results/<name>.jsonl and print it as it lands."""
    rows.append(row)
    append_result(name, {**row, "size": size})
    print(json.dumps(row), flush=True)


def print_table(rows: list[dict[str, Any]], keys: list[str]) -> None:
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(_fmt(row.get(k)).ljust(widths[k]) for k in keys))


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """Each posttrain row's speed against a TRL row of the same workload (like for like), else against one of another
    workload, which is named: a ratio between different work says so. Of those, the first run after it, else the last
    before it, so that repeated runs (dpo's and rm's `--runs posttrain:...,trl:...,posttrain:...,trl:...`, sft's and
    grpo's `--libraries posttrain,trl,posttrain,trl`) print consecutive pairs. Where both rows have one, posttrain's
    peak RSS follows as a multiple of TRL's (lower is better, unlike the speed ratio); where the two ran in different
    precisions (grpo's `--libraries posttrain:bf16,trl:fp32`), the line names them. Where a workload has two or more
    pairs of one kind, a last line gives the median of their ratios and, from six pairs on, a 95% interval for it
    (`median_interval`): the host's speed drifts by more than a single pair can tell apart from a target's margin."""
    trl = [(i, r) for i, r in enumerate(rows) if r["library"] == "trl"]
    if not trl:
        return
    ratios: dict[tuple[str, str], list[float]] = {}
    precisions = {r.get("precision") for r in rows}
    for index, row in enumerate(rows):
        if row["library"] != "posttrain":
            continue
        same = [(i, r) for i, r in trl if r["workload"] == row["workload"]]
        candidates = same or trl
        after = [r for i, r in candidates if i > index]
        other = after[0] if after else candidates[-1][1]
        memory = (f", peak RSS {row['peak_rss_mb'] / other['peak_rss_mb']:.2f}x TRL's"
                  if row.get("peak_rss_mb") and other.get("peak_rss_mb") else "")
        work = "the same workload" if same else "TRL: " + other["workload"]
        if row.get("precision") != other.get("precision"):
            work += f"; posttrain {row.get('precision')}, TRL {other.get('precision')}"
        elif len(precisions) > 1:  # pairs of both precisions: each named, summarised apart
            work += f"; both {row.get('precision')}"
        ratio = other["s_per_step"] / row["s_per_step"]
        ratios.setdefault((row["workload"], work), []).append(ratio)
        print(f"{row['workload']}: posttrain is {ratio:.2f}x TRL per step{memory} ({work})")
    for (workload, work), values in ratios.items():
        if len(values) < 2:
            continue
        median, interval = median_interval(values)
        spread = (f", {interval[2]:.1%} interval {interval[0]:.2f}-{interval[1]:.2f}x" if interval else
                  f" (range {min(values):.2f}-{max(values):.2f}x; a 95% interval needs 6 pairs)")
        print(f"{workload}: median of {len(values)} pairs {median:.2f}x TRL per step{spread} ({work})")


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, tuple[float, float, float] | None]:
    """The median of `values` and a distribution-free interval for the median they are drawn from: (low, high,
    coverage), the k-th smallest and the k-th largest value with the largest k whose coverage, 1 - 2 P(Binomial(n,
    1/2) < k), reaches `confidence` (each value independently as likely above that median as below it). None where
    even the range (k = 1) falls short: fewer than 6 values for 95%."""
    ordered, n = sorted(values), len(values)
    interval = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
        if coverage < confidence:
            break
        interval = (ordered[k - 1], ordered[n - k], coverage)
    return statistics.median(ordered), interval


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


def offline_overrides(directory: Path, out: str, batch_mode: str, steps: int, batch: int, max_length: int,
                      lr: float) -> list[str]:
    """The settings every offline (SFT, RM, DPO) posttrain worker shares: plain-text rows, one micro-batch per
    step, constant lr, AdamW as TRL's defaults (no weight decay, beta2 0.999), no checkpoints or progress."""
    return [f"model.path={directory}", f"run.out_dir={out}", "run.progress=false", "run.log_every=1000",
            "data.template=plain", f"data.max_length={max_length}", f"data.batch_mode={batch_mode}",
            f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
            f"train.precision={PRECISION}",
            "train.save_every=0", f"optim.lr={lr}", "optim.schedule=constant", "optim.warmup_steps=0",
            "optim.weight_decay=0", "optim.beta2=0.999", "optim.grad_clip=1.0"]


def shares_prompts(cfg: Any) -> bool:
    """Whether a comparison workload's padding-free batches lay each prompt out once (`data.share_prompts`): its MFU
    as 6 N x the sequences' tokens would count every shared prompt once per answer (`StepClock.summary`)."""
    return cfg.data.batch_mode == "padding_free" and cfg.data.share_prompts and cfg.data.packed_attention == "mask"


def timed_fit(trainer: Any, source: Any, loss_fn: Any, model: torch.nn.Module, mfu: bool = True) -> dict[str, Any]:
    """Run a posttrain Trainer under a StepClock and return the clock's summary (`StepClock.summary`)."""
    clock = StepClock()
    timed = TimedSource(source, clock)
    save = trainer.save

    def save_after_the_clock(*args: Any, **kwargs: Any) -> Any:
        # The Trainer always checkpoints its last step (so a finished run can be continued), inside that step's
        # iteration. TRL's clock stops at on_step_end, and its runs here save nothing: the last step's time ends
        # before posttrain's once-per-run checkpoint too (it had added ~0.7 s to the last step of a small-model SFT).
        if trainer.step >= trainer.train_cfg.max_steps:
            timed.finish()
        return save(*args, **kwargs)

    trainer.save = save_after_the_clock
    clock.start()
    with profiled(f"{trainer.stage}-posttrain-{PRECISION}"):
        trainer.fit(timed, loss_fn)
    timed.finish()
    return clock.summary(non_embedding_parameters(model), mfu=mfu)


def timed_rl_fit(trainer: Any, source: Any, loss_fn: Any, model: torch.nn.Module) -> dict[str, Any]:
    """`timed_fit` plus the generation share of the step time and the mean completion length, from the run's
    metrics after the warm-up steps."""
    from posttrain.train.metrics import read_metrics

    summary = timed_fit(trainer, source, loss_fn, model, mfu=False)
    records = read_metrics(trainer.run_dir.metrics)[WARMUP_STEPS:]
    return {**summary,
            "generation_share": statistics.mean(r["generation_s"] for r in records) / statistics.mean(
                r["step_time_s"] for r in records),
            "completion_length": statistics.mean(r["completion_length"] for r in records)}
