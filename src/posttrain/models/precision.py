"""Mixed precision: bf16 autocast for the matmuls, fp32 master weights, fp32 everywhere else.

`train.precision` is `fp32`, `bf16` or `auto`. `auto` picks bf16 only where the hardware computes it
natively: a CPU with AVX512_BF16 or AMX (x86) or BF16 (Arm), a GPU that reports bf16 support. Without
those instructions oneDNN emulates bf16 and a model-shaped GEMM runs ~45x *slower* than fp32 (measured
on an AVX2-only AMD Zen 3), so `auto` never picks it there; `bf16` set explicitly still runs.

What bf16 means here is what `torch.autocast` does: the parameters, their gradients and the optimizer
state stay fp32; linear layers, matmuls and attention run on bf16 copies of their inputs; the logits
are cast back to fp32 before any log-softmax (`algos.token_logprobs`), so logprobs, losses,
advantages, KL and value targets are fp32. Every forward of a run (training, the reference and
pi_old passes, rollouts, evaluation) runs under the same autocast, so the first update's ratio is
exactly 1 and the sampler/trainer logprob mismatch stays small (it is reported as `logprob_mismatch`).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (x86 `flags`, Arm `Features`); empty where unknown."""
    info = cpu_info()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def native_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why (for the log)."""
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return supported, f"{torch.cuda.get_device_name(device)} {'supports' if supported else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for {device.type}"
    flags = cpu_flags()
    found = [flag for flag in ("amx_bf16", "avx512_bf16", "bf16") if flag in flags]
    if found:
        return True, f"the CPU has {found[0].upper()}"
    return False, "the CPU has no AVX512_BF16, AMX or BF16 instructions (bf16 would be emulated, ~45x slower)"


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """`precision` (auto|fp32|bf16) -> ("fp32" | "bf16", the reason, for the log and the summary)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision, "as set"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"auto: {why}"


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"autocast takes a resolved precision (fp32 or bf16), got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def autocast_dtype(device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype the ambient autocast computes matmuls in on `device`, or None outside autocast."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 tensor (a head's output under autocast) as fp32; fp32 and fp64 tensors as they are."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor
