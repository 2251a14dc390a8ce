"""The decoder's linear layers through oneDNN, with each weight reordered once per generation.

On CPU, `F.linear` in fp32 calls MKL's sgemm. On CPUs where MKL does not pick its widest kernels
(AMD Zen 4/5 with AVX-512 among them) oneDNN, which dispatches on the instruction set it finds,
runs the same fp32 products 2-2.5x faster: on the 2-core benchmark machine 390-480 GFLOP/s at
the decode shape (M=64) against MKL's 160-180 (benchmarks/generate.py, `engine_mkl_gemm`).
Reordering a weight into oneDNN's blocked layout costs about one copy of it, so it is done once
per generation and reused by the prefill and every decode step. Where this runs is decided per CPU
(`models.onednn.onednn_linear_preferred(packed_weights=True)`): every AVX-512 CPU, and others where a
one-off measurement found it faster (an AVX2-only Zen 2 EPYC: 1.2-1.4x MKL at 64 rows). Results are fp32 products with
another summation order: they differ from MKL's by rounding (~1e-6 relative), no more.

Under bf16 autocast (`train.precision=bf16`) the packed weights are bf16 copies and the products
bf16, as autocast's own linear would compute them, without casting every weight at every step (on CPUs where
oneDNN has bf16 kernels: AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere autocast's own linear runs).
Only plain `nn.Linear` modules on CPU in fp32 without forward hooks take this path; anything else
(LoRA layers, which compute more than their weight; hooked modules; GPU) runs as its own module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.modules import module as nn_module

from posttrain.models.onednn import OneDNNLinear, onednn_bf16_available, onednn_linear_available, packed_linear


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling the module runs more than its forward (a hook of its own or a global one)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


class LinearRunner:
    """Calls `linear(module, x)`: oneDNN with a packed weight for the modules packed at construction,
    the module itself for the others. `batch_hint` is the row count the reordered layout is tuned for;
    `dtype` the products' precision (fp32, or bf16 under autocast). Each `fused` group of packable modules with one
    input width (q/k/v, gate/up) gets one packed weight, their rows stacked, for `each` to call them by as one product;
    its members are not packed alone (one packed copy of each weight), so called alone they run as their modules."""

    def __init__(self, modules: list[torch.nn.Module], batch_hint: int, onednn: bool = True,
                 dtype: torch.dtype = torch.float32, fused: Sequence[Sequence[torch.nn.Module]] = ()) -> None:
        self.packed: dict[torch.nn.Module, tuple[Tensor, Tensor | None]] = {}
        self.fused: dict[tuple[torch.nn.Module, ...], tuple[Tensor, Tensor | None, list[int]]] = {}
        self.dtype = dtype
        # bf16 products go through oneDNN whatever the fp32 choice is (torch's own bf16 CPU linear is oneDNN too),
        # where oneDNN's bf16 kernels exist: an AVX2-only CPU keeps torch's linear under autocast.
        wanted = onednn_linear_available(packed_weights=True) if dtype == torch.float32 else onednn_bf16_available()
        if not (onednn and wanted and dtype in (torch.float32, torch.bfloat16)):
            return
        packable = [m for m in modules if type(m) in (torch.nn.Linear, OneDNNLinear) and m.weight.device.type == "cpu"
                    and m.weight.dtype == torch.float32 and not _has_hooks(m)]
        for group in map(tuple, fused):
            if len(group) > 1 and all(m in packable for m in group) and len({m.in_features for m in group}) == 1:
                self.fused[group] = (*self._packed(group, batch_hint), [m.out_features for m in group])
        stacked = {m for group in self.fused for m in group}
        self.packed = {m: self._packed((m,), batch_hint) for m in packable if m not in stacked}

    def _packed(self, group: tuple[torch.nn.Module, ...], batch_hint: int) -> tuple[Tensor, Tensor | None]:
        """The modules' weights, their rows stacked [sum of outs, in], packed; their biases stacked alike (zeros for a
        module without one where another has one), None where none has one."""
        weight = torch.cat([m.weight.detach() for m in group]).to(self.dtype)
        bias = None
        if any(m.bias is not None for m in group):
            bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach()
                              for m in group]).to(self.dtype)
        return torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), bias

    def __call__(self, module: torch.nn.Module, x: Tensor) -> Tensor:
        return self.each([module], x)[0]

    def each(self, modules: list[torch.nn.Module], x: Tensor) -> list[Tensor]:
        """Every module applied to the same input (q/k/v, gate/up), which is cast to the products' dtype once; one
        product where the modules were `fused`, its outputs views of one [rows, sum of outs] tensor (strided rows)."""
        stacked = self.fused.get(tuple(modules))
        if stacked is not None:
            packed, bias, widths = stacked
            return list(packed_linear(x.to(self.dtype), packed, bias).split(widths, dim=-1))
        cast = x if x.dtype == self.dtype or not any(m in self.packed for m in modules) else x.to(self.dtype)
        outputs = []
        for module in modules:
            entry = self.packed.get(module)
            outputs.append(module(x) if entry is None else packed_linear(cast, *entry))
        return outputs
