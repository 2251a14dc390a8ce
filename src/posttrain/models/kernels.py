"""The CPU kernels every model posttrain builds, loads or trains runs on."""

from __future__ import annotations

import torch

from posttrain.models.cpu_attention import use_cpu_attention
from posttrain.models.lean_layers import use_lean_layers
from posttrain.models.onednn import use_onednn_linears


def use_fast_kernels(model: torch.nn.Module) -> None:
    """oneDNN's fp32 linears where they beat torch's GEMM on this CPU (`models.onednn`), attention in the
    faster precision per shape under CPU bf16 autocast (`models.cpu_attention`), and MLPs and norms that keep
    less for the backward (`models.lean_layers`, bitwise the same). Idempotent; a model keeps computing what
    transformers' own layers compute, up to rounding."""
    use_onednn_linears(model)
    use_cpu_attention(model)
    use_lean_layers(model)
