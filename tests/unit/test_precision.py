"""train.precision: auto picks bf16 only where the hardware computes it natively; autocast only for bf16."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import precision
from posttrain.models.precision import autocast, resolve_precision, upcast


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse avx2 avx512f avx512_bf16", "bf16"),  # AMD Zen 4/5, Intel Cooper Lake
    ("fpu avx2 avx512f amx_bf16 amx_tile", "bf16"),  # Intel Sapphire Rapids and later
    ("fpu sse avx2 fma", "fp32"),  # AVX2 only (Zen 3): bf16 would be emulated
    ("fpu avx2 avx512f avx512bw", "fp32"),  # AVX-512 without its bf16 extension
    ("", "fp32"),  # unknown CPU
])
def test_auto_picks_bf16_only_with_native_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_info", lambda: {"flags": flags})
    chosen, reason = resolve_precision("auto", "cpu")
    assert chosen == expected and reason.startswith("auto: ")


def test_an_explicit_precision_is_kept_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda: {"flags": "avx2"})
    assert resolve_precision("bf16", "cpu") == ("bf16", "as set")
    assert resolve_precision("fp32", "cpu") == ("fp32", "as set")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocasts_linear_layers_and_fp32_does_not():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32


def test_upcast_widens_only_half_precision():
    assert upcast(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert upcast(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
