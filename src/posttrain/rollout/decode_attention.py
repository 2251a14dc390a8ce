"""The rollout engine's decode attention, two ways: torch's batched products, or a C++ kernel built for this machine.

One decode step's attention (`LlamaDecoder.step`) is one query per row against its prompt's cached keys and values,
shared by the prompt's n rows, and against its own new tokens' ones. It reads every cache once a step, so it is bound
by memory. torch's batched one-row products read them at ~20 GB/s on a 2-core Zen 5 EPYC (each batch entry has a cost
of its own, and the one-row scores then go through a concatenation and transposed copies); `decode_attention.cpp`
sums each query's products with the key and value rows in vector registers, one thread task per prompt and key/value
head (its cache read from memory once for the prompt's n rows and the heads that share it), at ~45 GB/s. One step's
attention, 8 layers, alone (benchmarks/README, eighteenth session): generation-shaped (64 prompts, one row each,
four length groups) 3.9 ms against 8.9; GRPO-shaped (8 prompts x 8 rows) 1.8 against 4.0. Both compute softmax(q k^T
+ bias) v in fp32; they differ by the order of their sums (a few 1e-6).

The kernel is built with torch's extension builder (`torch.utils.cpp_extension.load`: a C++ compiler and ninja) the
first time a process needs it, into torch's extension cache (`TORCH_EXTENSIONS_DIR`, else
~/.cache/torch_extensions), and loaded from there by every later process: ~10 s once per machine. It is
compiled for this CPU's instructions (`-march=native`), so its name carries a digest of the CPU's flags (with the
source's and torch's version): another CPU builds its own. `POSTTRAIN_DECODE_KERNEL` chooses: `auto` (the default)
uses it where it builds and measured faster than torch's products on this machine (`models.machine_choices`, once
per machine: a different CPU may differ), `1` wherever it applies (an error where it cannot be built), `0` never.
Where `auto` cannot build it (no compiler, no OpenMP, another platform), the engine keeps torch's products and warns
once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.models.machine_choices import best_seconds, measured_choice
from posttrain.models.precision import cpu_flags, cpu_info

SOURCE = Path(__file__).with_name("decode_attention.cpp")
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp")
LINK_FLAGS = ("-fopenmp",)  # torch's own OpenMP runtime (libgomp.so.1, loaded with torch) serves the kernel's loops
CHOICES = ("auto", "0", "1")
HEAD_DIM_STEP, MAX_HEAD_DIM = 16, 256  # the head sizes the kernel takes (decode_attention.cpp's `check`)
# What a failed build or load raises: no compiler or ninja, a compile or link error, a library that will not load.
BUILD_ERRORS = (OSError, RuntimeError, ImportError, subprocess.CalledProcessError)

# (q, prompt_keys, prompt_values, prompt_bias, prompt_lengths, new_keys, new_values, count, n) -> out [rows, heads, D]
DecodeAttention = Callable[..., Tensor]


def left_padding_bias(lengths: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """[prompts, width]: 0 on each prompt's slots, the last `lengths` of the width, -inf on its left padding."""
    slots = torch.arange(width, device=lengths.device)
    return torch.zeros((len(lengths), width), device=lengths.device, dtype=dtype).masked_fill_(
        slots < width - lengths[:, None], float("-inf"))


def torch_attention(q: Tensor, prompt_keys: Tensor, prompt_values: Tensor, prompt_bias: Tensor,
                    prompt_lengths: Tensor, new_keys: Tensor, new_values: Tensor, count: int, n: int) -> Tensor:
    """One (pre-scaled) query per row against its prompt's slots of its group's cache and its first `count` new
    slots: softmax(q k^T + bias) v over both, for the n rows of each of the group's m prompts.

    The prompt part runs as one product per prompt and key/value head, whose rows are the n samples'
    queries (times the heads sharing that key/value head): the prompt's keys are read once for all n.
    Plain batched matmuls on views of the caches (a row's cache [kv_heads, S, D] is contiguous, so
    [rows * kv_heads, S, D] is a view, and a slot range of the new tokens' cache a strided one that bmm reads
    as it is); for a single query per row they are faster on CPU than SDPA's flash kernel, made for many
    queries. q [m * n, heads, D], prompt caches [m, kv, P, D], prompt_bias [m, P] (0 on a prompt's slots, -inf on
    its left padding; `prompt_lengths` [m], the kernel's form of it, is not read here), new caches [m * n, kv, T, D]
    -> [m * n, heads, D].
    """
    prompts, kv, width, dim = prompt_keys.shape
    rows, heads = q.shape[:2]
    per_kv = heads // kv
    # Prompt part: [m * kv, n * per_kv, width], the n samples' queries side by side per prompt and head.
    shared_q = q.view(prompts, n, kv, per_kv, dim).transpose(1, 2).reshape(prompts * kv, n * per_kv, dim)
    keys = prompt_keys.view(prompts * kv, width, dim)
    prompt_scores = torch.bmm(shared_q, keys.transpose(1, 2)).view(prompts, kv, n * per_kv, width)
    prompt_scores = prompt_scores.add_(prompt_bias[:, None, None])
    prompt_scores = prompt_scores.view(prompts, kv, n, per_kv, width).transpose(1, 2)  # [m, n, kv, per_kv, P]
    # New-token part: [rows * kv, per_kv, count], each row against its own tokens.
    slots = new_keys.shape[2]
    new_k = new_keys.view(rows * kv, slots, dim)[:, :count]
    new_scores = torch.bmm(q.view(rows * kv, per_kv, dim), new_k.transpose(1, 2))
    probs = torch.cat([prompt_scores.reshape(rows * kv, per_kv, width), new_scores], dim=-1).softmax(dim=-1)
    prompt_probs = probs[..., :width].reshape(prompts, n, kv, per_kv, width).transpose(1, 2)
    prompt_out = torch.bmm(prompt_probs.reshape(prompts * kv, n * per_kv, width),
                           prompt_values.view(prompts * kv, width, dim))
    prompt_out = prompt_out.view(prompts, kv, n, per_kv, dim).transpose(1, 2).reshape(rows, heads, dim)
    new_out = torch.bmm(probs[..., width:], new_values.view(rows * kv, slots, dim)[:, :count])
    return prompt_out.add_(new_out.view(rows, heads, dim))


def kernel_attention(q: Tensor, prompt_keys: Tensor, prompt_values: Tensor, prompt_bias: Tensor,
                     prompt_lengths: Tensor, new_keys: Tensor, new_values: Tensor, count: int, n: int) -> Tensor:
    """`torch_attention` through the C++ kernels: the scores [rows, heads, P + count] (-inf on a prompt's left
    padding, whose slots the kernels never read: `prompt_lengths` [m] int64 says where each prompt starts; the bias
    is not read here), torch's softmax over them, then the weighted sum of the values."""
    ops = kernel_ops()
    scores = ops.decode_scores(q, prompt_keys, prompt_lengths, new_keys, count, n)
    return ops.decode_mix(scores.softmax(dim=-1), prompt_values, prompt_lengths, new_values, count, n)


def decode_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> DecodeAttention:
    """The decode attention for caches of `dtype` on `device`: the kernel where it applies (fp32 CPU caches, a head
    size the kernel takes: `HEAD_DIM_STEP` multiples up to `MAX_HEAD_DIM`) and `POSTTRAIN_DECODE_KERNEL` chooses
    it, else torch's products."""
    choice = os.environ.get("POSTTRAIN_DECODE_KERNEL", "auto")
    if choice not in CHOICES:
        raise ValueError(f"POSTTRAIN_DECODE_KERNEL must be auto, 0 or 1, got {choice!r}")
    applies = (device.type == "cpu" and dtype == torch.float32 and head_dim % HEAD_DIM_STEP == 0
               and 0 < head_dim <= MAX_HEAD_DIM)
    if choice == "0" or not applies:
        return torch_attention
    if choice == "1":
        try:
            kernel_ops()  # built now: an error here, not inside a generation
        except BUILD_ERRORS as error:
            raise RuntimeError(f"POSTTRAIN_DECODE_KERNEL=1, but the decode-attention kernel cannot be built here: "
                               f"{_build_error(error)}") from error
        return kernel_attention
    # The source's digest in the choice's name: a changed kernel is measured again.
    if _buildable() and measured_choice(f"fp32 decode attention {_digest()[:8]}", ("kernel", "torch"),
                                        _measure) == "kernel":
        return kernel_attention
    return torch_attention


@functools.cache
def kernel_ops() -> Any:
    """The kernels' op namespace (`torch.ops.posttrain_decode`), built or loaded once per process.

    Built under a lock of our own, which the system releases when its holder dies: torch's builder waits on a lock
    file of its own without a timeout, and one left by a builder killed mid-build (SIGKILL, out of memory) would hang
    every later process. Holding ours, any such file is stale and goes. torch finds ninja on PATH: where it is not
    there (a virtualenv used without activating it), the `ninja` package's own binary is added at PATH's end.

    It compiles a copy of the source kept in the build directory, not the installed file: the compile command names
    its source's path, and ninja rebuilds when a command changes, so two installs of one version (a checkout and a
    worktree, two virtualenvs) rebuilt the library in turn, a full compile each time. The directory's name holds the
    source's digest, so its copy is that source."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), ninja.BIN_DIR])
    directory = build_directory()
    name = directory.name
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "posttrain.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)  # torch's, left by a builder that died
        source, part = directory / SOURCE.name, directory / f"{SOURCE.name}.part"
        if not source.is_file():  # written once: a newer modification time would make ninja compile again
            shutil.copyfile(SOURCE, part)  # whole or absent: a copy cut short by a kill would be compiled from then on
            part.replace(source)
        load(name=name, sources=[str(source)], extra_cflags=list(COMPILE_FLAGS), extra_ldflags=list(LINK_FLAGS),
             build_directory=str(directory), is_python_module=False, verbose=False)
    return torch.ops.posttrain_decode


def build_directory() -> Path:
    """Where the kernel is built for this source, these flags, this torch and this CPU: in torch's extension cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / f"posttrain_decode_{_digest()}"


@functools.cache
def _digest() -> str:
    """What the built library holds for: the source, the flags, torch's version and this CPU (-march=native)."""
    return hashlib.sha256("|".join([SOURCE.read_text(), *COMPILE_FLAGS, torch.__version__,
                                    cpu_info().get("model name", ""), *sorted(cpu_flags())]).encode()).hexdigest()[:16]


@functools.cache
def _buildable() -> bool:
    """Whether the kernel builds (or is already built) here; warns once where it does not."""
    try:
        kernel_ops()
    except BUILD_ERRORS as error:
        warnings.warn(f"posttrain: the rollout engine's decode-attention kernel could not be built here "
                      f"({_build_error(error)}); torch's batched products run instead (POSTTRAIN_DECODE_KERNEL=0 skips "
                      "the attempt)", stacklevel=3)
        return False
    return True


def _build_error(error: BaseException) -> str:
    """The line that says why: torch's build error carries ninja's output, whose first lines are compile commands, so
    the compiler's first `error` line, else ninja's `FAILED` one, else the first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for marker in ("error:", "FAILED"):
        found = [line for line in lines if marker in line]
        if found:
            return found[0][:300]
    return lines[0][:300] if lines else type(error).__name__


def _measure() -> str:
    """"kernel" where the kernel ran one generation-shaped and one GRPO-shaped step's attention (8 layers of the
    small model's caches: 64 prompts x 1 row in groups of 16, and 8 prompts x 8 rows) faster than torch's
    products, else "torch"."""
    generator = torch.Generator().manual_seed(0)

    def step(prompts: int, n: int, width: int, layers: int = 8, kv: int = 8, dim: int = 64, slots: int = 32,
             count: int = 16) -> list[tuple]:
        lengths = torch.randint(width // 2, width + 1, (prompts,), generator=generator)
        bias = left_padding_bias(lengths, width, torch.float32)
        return [(torch.randn(prompts * n, kv, dim, generator=generator),
                 torch.randn(prompts, kv, width, dim, generator=generator),
                 torch.randn(prompts, kv, width, dim, generator=generator), bias, lengths,
                 torch.randn(prompts * n, kv, slots, dim, generator=generator),
                 torch.randn(prompts * n, kv, slots, dim, generator=generator), count, n) for _ in range(layers)]

    # the generation's four length groups, then a GRPO-shaped step
    calls = [call for width in (50, 65, 80, 100) for call in step(16, 1, width)] + step(8, 8, 92)
    seconds = best_seconds({way: functools.partial(_run, attention, calls)
                            for way, attention in (("kernel", kernel_attention), ("torch", torch_attention))})
    return "kernel" if seconds["kernel"] < seconds["torch"] else "torch"


def _run(attention: DecodeAttention, calls: list[tuple]) -> None:
    for arguments in calls:
        attention(*arguments)
