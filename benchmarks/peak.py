"""The physical limit of this CPU for the benchmark models: GEMM throughput at their shapes, per library and precision.

    python -m benchmarks.peak [--tokens 4096] [--reps 9]

MFU needs the peak of the precision and GEMM library actually used, measured on the machine that ran the
benchmark (BENCHMARK.md's 188 GFLOP/s was MKL's fp32 sgemm on one CPU; oneDNN's fp32 kernels run 1.3-2.5x
that on AVX-512 CPUs, and bf16 more where the CPU has AVX512_BF16 or AMX). On 2 threads, for the linear
layers of the `small` model (hidden 512, FFN 1408, vocabulary 1024) applied to `--tokens` rows, it times:

    fp32 MKL      torch's F.linear (what TRL runs, and posttrain with POSTTRAIN_ONEDNN=0)
    fp32 oneDNN   torch.ops.mkldnn._linear_pointwise (posttrain's `models.onednn` linears)
    bf16          F.linear on bf16 tensors (torch's CPU bf16 path, oneDNN); slow on CPUs without bf16 instructions

and prints GFLOP/s per shape and the model-shaped peak: the FLOPs of one pass through every shape (in the
model's proportions: 4 attention projections, 3 FFN products per layer, the output head once per 8 layers)
divided by their total time. Rows are appended to benchmarks/results/peak.jsonl with the CPU they ran on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import append_result, print_table

HIDDEN, FFN, VOCAB, LAYERS = 512, 1408, 1024, 8
# (name, in_features, out_features, count per model pass)
SHAPES = [("attention projection", HIDDEN, HIDDEN, 4 * LAYERS), ("ffn up / gate", HIDDEN, FFN, 2 * LAYERS),
          ("ffn down", FFN, HIDDEN, LAYERS), ("output head", HIDDEN, VOCAB, 1)]


def paths() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
    from posttrain.models.onednn import matmul_transposed, onednn_ops_available

    # both libraries wherever both run: the peak is the faster one's, whichever posttrain trains with here
    return {"fp32 MKL": F.linear, "fp32 oneDNN": matmul_transposed if onednn_ops_available() else None,
            "bf16": F.linear}


def seconds_per_call(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor,
                     reps: int) -> float:
    fn(x, w)  # warm-up: oneDNN builds its primitive on the first call
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(path: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: int,
            reps: int) -> list[dict[str, object]]:
    """GFLOP/s of each model shape on `path`, then the model-shaped peak (the last row)."""
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if path.startswith("bf16") else torch.float32
    rows, total_flops, total_seconds = [], 0.0, 0.0
    for name, n_in, n_out, count in SHAPES:
        x = torch.randn(tokens, n_in, generator=generator).to(dtype)
        w = torch.randn(n_out, n_in, generator=generator).to(dtype)
        seconds = seconds_per_call(fn, x, w, reps)
        flops = 2.0 * tokens * n_in * n_out
        total_flops, total_seconds = total_flops + count * flops, total_seconds + count * seconds
        rows.append({"path": path, "shape": f"{name} [{tokens}x{n_in}] @ [{n_in}x{n_out}]",
                     "gflops": flops / seconds / 1e9})
    rows.append({"path": path, "shape": "model-shaped peak", "gflops": total_flops / total_seconds / 1e9})
    return rows


def gpu_matmul_peak(precision: str, size: int = 8192, reps: int = 10) -> float:
    """GFLOP/s of a size^3 matmul on the GPU in `precision` (fp32: TF32 off, as torch's default), mean of `reps`
    after 3 warm-ups, timed with CUDA events: the limit a GPU row's MFU is against."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (start.elapsed_time(end) / 1e3) / 1e9


def model_shaped_peak(precision: str, tokens: int = 4096, reps: int = 9) -> float:
    """The physical limit of `precision` here: the fastest available path's model-shaped GFLOP/s."""
    torch.set_num_threads(2)
    found = [measure(path, fn, tokens, reps)[-1]["gflops"] for path, fn in paths().items()
             if fn is not None and path.startswith(precision)]
    return max(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for path, fn in paths().items():
        if fn is None:
            print(f"{path}: not available in this torch build")
            continue
        measured = measure(path, fn, args.tokens, args.reps)
        rows.extend(measured)
        append_result("peak", {"path": path, "tokens": args.tokens, "threads": 2,
                               "gflops": {r["shape"]: r["gflops"] for r in measured}})
    print_table(rows, ["path", "shape", "gflops"])


if __name__ == "__main__":
    main()
