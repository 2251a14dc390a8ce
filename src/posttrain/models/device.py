"""The device a process's models live on.

One process trains on one device. Where CUDA is available that is the process's GPU (`cuda:LOCAL_RANK`, the
GPU torchrun assigns it; `cuda:0` without torchrun), else the CPU. `POSTTRAIN_DEVICE` (`cpu`, `cuda`, `cuda:1`)
overrides the choice, e.g. to run on the CPU of a GPU machine. Every model a run loads (policy, reference,
reward model, critic, graders' models, evaluation) goes there, so their inputs are moved once, where they
meet a model.

On a GPU, torch's attention (`scaled_dot_product_attention`) runs without cuDNN's backend (`settle_gpu_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch

from posttrain.errors import ConfigError


def default_device() -> torch.device:
    """This process's device: `POSTTRAIN_DEVICE` if set, else its GPU where CUDA is available, else the CPU."""
    device = _chosen_device()
    if device.type == "cuda":
        settle_gpu_attention()
    return device


def _chosen_device() -> torch.device:
    asked = os.environ.get("POSTTRAIN_DEVICE", "").strip()
    if asked:
        try:
            device = torch.device(asked)
        except RuntimeError as error:
            raise ConfigError(f"POSTTRAIN_DEVICE={asked!r} is not a device (cpu, cuda, cuda:N): {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"POSTTRAIN_DEVICE={asked!r} but CUDA is not available in this process")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@functools.cache
def settle_gpu_attention() -> None:
    """Turn off cuDNN's backend of torch's `scaled_dot_product_attention` in this process, unless
    `POSTTRAIN_CUDNN_ATTENTION=1` asks for torch's own choice.

    Where torch picks it (bf16/fp16 on recent GPUs), cuDNN builds an execution plan for every new shape of
    query, key and value, forward and backward apart, before it runs. Post-training changes shapes every step:
    RL rounds' completions, padding-free and packed rows, the rollout engine's prefill of each prompt length.
    Flash attention (no mask) and memory-efficient attention (4-D masks) have no per-shape setup, and take over.
    On an H100 (torch 2.11, cuDNN 9.19; `benchmarks/gpu_attention.py`), a bf16 forward + backward at the small
    model's 8 x 64 heads took 99-132 ms at a shape seen for the first time (1.6-1.8 s for the first with a 4-D
    mask) and 0.5-1.0 ms once seen; flash and memory-efficient attention 0.65-0.82 ms at new shapes. GRPO 8x8 in
    bf16 there: 1.08 s/step with cuDNN's attention, 0.53 without (benchmarks/README, 2026-12-06).
    """
    if os.environ.get("POSTTRAIN_CUDNN_ATTENTION", "").strip() != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def move_to(batch: Any, device: torch.device | str) -> Any:
    """`batch` with its tensors on `device`: a tensor, or dicts (updated in place), lists, tuples and dataclasses
    (copied) of them, nested; anything else as it is. Tensors already there are not copied."""
    if torch.is_tensor(batch):
        # Asynchronous host-to-device copies overlap with compute; a copy back to the host must be synchronous,
        # or the host reads the tensor before the copy has landed.
        return batch.to(device, non_blocking=torch.device(device).type != "cpu")
    if isinstance(batch, dict):
        for key, value in batch.items():
            batch[key] = move_to(value, device)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch
