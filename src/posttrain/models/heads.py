"""A causal LM's output head applied to chosen positions only."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel


@contextlib.contextmanager
def output_head_at(model: torch.nn.Module, rows: Tensor, cols: Tensor) -> Iterator[None]:
    """While active, the model's output embedding (lm_head) sees only the hidden states at (rows, cols),
    as one row [1, N, H], so its logits are [1, N, V]: those of the other positions are never computed.
    A hook rather than calling the decoder and the head ourselves, so the model's own forward (adapters,
    logit scaling or soft-capping after the head) stays in charge. The forward must compute the logits
    of every position (logits_to_keep=0, the default)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding to compute logits with")
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows, cols][None], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def floating_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's activations (and so of an additive attention mask for it)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def statistics_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of per-token logprobs and values computed from the model: its own, at least float32. A bf16 or
    fp16 model's are computed in float32 (`algos.token_logprobs`, the value heads), and kept in its dtype they
    would round by up to ~0.03: the first update's ratio would not be 1, and small KLs would vanish."""
    return torch.promote_types(floating_dtype(model), torch.float32)


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    parameters = inspect.signature(cls.forward).parameters
    return "logits_to_keep" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def forward_keeping(model: torch.nn.Module, keep: int | Tensor, **inputs: Any) -> Any:
    """`model(**inputs)` whose `.logits` are those of the positions `keep` only: the last `keep` (an int > 0) or
    these columns (a 1-D tensor). transformers' causal LMs compute no others (`logits_to_keep`); a forward that
    takes no such argument (older trust_remote_code models), or drops it in its **kwargs, computes every
    position's, and they are cut here, so callers never read the logits of the wrong positions."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    out = model(**inputs, **({"logits_to_keep": keep} if _forward_takes_logits_to_keep(type(inner)) else {}))
    logits = out.logits
    if isinstance(keep, Tensor):
        if logits.shape[1] != len(keep):
            out.logits = logits[:, keep]
    elif keep and logits.shape[1] != keep:  # keep=0: every position's, as transformers reads it
        out.logits = logits[:, -keep:]
    return out
