"""fp32 linear layers through oneDNN on CPU, forward and backward, for training as well as inference.

Why: on CPU, `F.linear` and its backward call MKL's sgemm. On CPUs where MKL does not pick its widest
kernels (MKL keys its dispatch on the vendor) oneDNN, which dispatches on the instruction set it finds, can
run the same fp32 products about twice as fast: on a 2-core AMD EPYC Zen 5 450-530 GFLOP/s against MKL's
210-230 at the small model's training shapes (forward and input gradient), 1-2x for the weight gradient.
The results are fp32 products summed in another order: they differ from MKL's by rounding (~1e-6 relative),
no more. No lower precision is involved anywhere (no bf16/tf32 "fast math").

`use_onednn_linears(model)` swaps the class of every plain `nn.Linear` in a model for `OneDNNLinear`,
a subclass whose forward takes the oneDNN path only where it applies (CPU, fp32, plain tensors, no
autocast) and is `nn.Linear.forward` everywhere else, so state dicts, `save_pretrained`, PEFT's LoRA
wrapping, DDP and FSDP see an ordinary `nn.Linear`.

Which GEMM, per CPU, is measured: how much oneDNN wins depends on the CPU, not only on its vendor or flags.
On an AMD EPYC Zen 5 (family 26) it ran the training products ~2x faster than MKL; on a Zen 4 (family 25 model
17, AVX-512 + AVX512_BF16) forward + backward of the small model's linears ran at 0.84-1.10x MKL's speed, SFT
steps were as fast either way and the swap cost 90-175 MB of peak RSS; on an Intel Xeon with AVX-512 and AMX
(Sapphire Rapids class) MKL runs its best kernels and the swap *lost* (SFT steps 10-11% slower, ~100 MB more
peak RSS). So `POSTTRAIN_ONEDNN=auto` (the default) swaps on a CPU with AVX-512 where a one-off measurement
(`_measure_training_linears`: forward + backward of three model-shaped linears through each library, about a
second) found oneDNN at least `MIN_SPEEDUP` times faster, the answer kept per machine (`models.machine_choices`);
never on an AVX2-only CPU, where it was never measured to win (0.90-0.92x MKL on a Zen 2 EPYC); `1` always, `0`
never (torch's own GEMM). The rollout engine's weights, reordered once and reused for every decode step
(`packed_weights`), take oneDNN on any AVX-512 CPU, where that won on every CPU measured, and on other CPUs where
a one-off measurement of the decode products (`_measure_packed_linears`) finds it `MIN_SPEEDUP` times faster: on
an AVX2-only Zen 2 EPYC (family 23 model 49) the 64-row products ran at 116-135 GFLOP/s against MKL's 82-111, and a
GRPO 8x8 round of the small model sampled in 1.73-1.77 s against 2.11-2.13.
The ops used (`torch.ops.mkldnn._linear_pointwise`, the one inductor's CPU backend uses) are private:
without them, or without oneDNN in the torch build, nothing is swapped.

Memory: two caches keep one primitive per distinct product shape (its rows included), each holding memory of its own
(JIT-compiled kernels, ~0.2-0.6 MB a decode product's shape; more for training's, below): oneDNN's own (process-wide,
`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and the one torch keeps in front of it for these ops (per thread,
`LRU_CACHE_CAPACITY`), both 1024 shapes by default. Shapes change with every batch: training's (padding-free rows,
padded lengths, reference passes over a data set) and the rollout engine's prefill, whose rows are the round's prompt
tokens. Uncapped, oneDNN's cache grew peak RSS by ~230 MB over 40 DPO steps on the small model (1969 -> 1741 MB with the
cap, 64 then), and torch's grew a GRPO run of the tiny model by ~0.6 MB a step, every step (670 -> 890 MB over 350
steps: a leak to the eye, up to ~600 MB before its cap); 1,800 distinct shapes through the engine's products cost 624 MB
with torch's cache uncapped, 29 MB with it capped (at 64). Importing this module caps both at `PRIMITIVE_CACHE_CAPACITY`
unless the variable is already set; each cache reads its variable when it is first used, so from import on.

Why 24: the cap sets how much memory stale shapes keep (a step's training products are new shapes, and a primitive's
memory is freed only once both caches have let it go), and a training product's primitive keeps far more than a decode
product's: ~2-3.5 MB a shape in fp32 SFT. Padded and padding-free SFT in fp32 (AMD EPYC Zen 5, oneDNN linears) peaked at
1711-1739 / 1463-1469 MB with 64, 1645-1658 / 1413-1424 with 32, 1587-1629 / 1374-1380 with 24 and 1563 / 1368 with 16
(TRL's 1597 / 1376), at the same speed within the host's spread. Not 16: a bf16 GRPO step (attention over the prefix
tree runs many product shapes a layer) took 1.27-1.30 s with 16, 7-9% more than with 64 in both rounds that ran them
side by side and 3-4% more than with 24 in a third; 24 was never behind 64 when alternated. Creating a primitive costs
little next to a product of a few hundred rows.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.models.machine_choices import best_seconds, measured_choice
from posttrain.models.precision import cpu_flags

PRIMITIVE_CACHE_CAPACITY = 24
# The training products measured to choose the library: (rows, in, out) of the small model's attention
# projection and MLP up and down projections, 21 GFLOP forward + backward in all (~0.1 s a round on 2 cores).
# Not fewer rows or shapes: at 1024 rows without the up projection (where oneDNN is slowest on a Zen 4) oneDNN
# measured 1.09-1.14x MKL on that CPU, against 1.00-1.06x for these, and its SFT steps ran no faster.
MEASURED_SHAPES = ((2048, 512, 512), (2048, 512, 1408), (2048, 1408, 512))
MIN_SPEEDUP = 1.15  # oneDNN costs memory (above): a near tie goes to torch's own GEMM
# The decode products measured for the engine's packed weights: a step's rows (a batch of 64 completions) through
# the same three shapes, each weight reordered once for the row count as `rollout.gemm` does.
DECODE_ROWS = 64
CACHE_CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, torch's
for _variable in CACHE_CAPACITY_VARIABLES:
    os.environ.setdefault(_variable, str(PRIMITIVE_CACHE_CAPACITY))


def onednn_ops_available() -> bool:
    """Whether this torch build has oneDNN and the (private, inductor-used) linear ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def onednn_bf16_available() -> bool:
    """Whether oneDNN's bf16 linear ops run on this CPU: they need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT and
    raise otherwise (an AVX2-only CPU), where torch's own bf16 linear still runs (emulated, slowly)."""
    return onednn_ops_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_linear_preferred(packed_weights: bool = False) -> bool:
    """Whether fp32 linears should run on oneDNN on this CPU: `POSTTRAIN_ONEDNN` 1/0, or (auto) a CPU with
    AVX-512 where oneDNN measured faster for training (`_measure_training_linears`, once per machine). Weights
    reordered once and reused many times (`packed_weights`: the rollout engine's decode steps) win on any AVX-512
    CPU (Intel Xeon with AMX: 8x8 GRPO sampling 1.04 vs 1.15 s; Zen 4 EPYC: 894 vs 743 new tokens/s at batch 64)
    and elsewhere where `_measure_packed_linears` found them faster (once per machine)."""
    choice = os.environ.get("POSTTRAIN_ONEDNN", "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"POSTTRAIN_ONEDNN must be auto, 0 or 1, got {choice!r}")
    if choice != "auto":
        return choice == "1"
    if packed_weights:
        return "avx512f" in cpu_flags() or measured_choice(
            "fp32 packed decode linears", ("onednn", "torch"), _measure_packed_linears) == "onednn"
    if "avx512f" not in cpu_flags():
        return False
    # "r2": the weight gradient's way changed (`_SharedInput`); a choice measured before it is measured again
    return measured_choice("fp32 training linears r2", ("onednn", "torch"), _measure_training_linears) == "onednn"


def _measure_training_linears() -> str:
    """"onednn" where forward + backward of the small model's linear shapes ran at least `MIN_SPEEDUP` times
    faster through oneDNN than through torch's `F.linear`, else "torch" (the library that costs no extra memory:
    oneDNN keeps reordered copies and primitives of its own), also where oneDNN's ops fail here."""
    def runs(rows: int, inputs: int, outputs: int, generator: torch.Generator) -> dict[str, Callable[[], None]]:
        x = torch.randn(rows, inputs, generator=generator, requires_grad=True)
        weight = torch.randn(outputs, inputs, generator=generator, requires_grad=True)
        grad = torch.randn(rows, outputs, generator=generator)
        linears = {"torch": torch.nn.functional.linear, "onednn": _LinearFunction.apply}
        return {library: functools.partial(_three_products, linear, x, weight, grad)
                for library, linear in linears.items()}

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return _faster_by_the_margin(runs)


def _measure_packed_linears() -> str:
    """"onednn" where `DECODE_ROWS` rows through the small model's three linear shapes ran at least `MIN_SPEEDUP`
    times faster through oneDNN with each weight reordered once (the rollout engine's decode products) than
    through torch's `F.linear`, else "torch", also where oneDNN's ops fail here."""
    def runs(_: int, inputs: int, outputs: int, generator: torch.Generator) -> dict[str, Callable[[], None]]:
        x = torch.randn(DECODE_ROWS, inputs, generator=generator)
        weight = torch.randn(outputs, inputs, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_ROWS)
        return {"torch": functools.partial(_repeated, torch.nn.functional.linear, x, weight),
                "onednn": functools.partial(_repeated, packed_linear, x, packed)}

    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        return _faster_by_the_margin(runs)


def _faster_by_the_margin(runs: Callable[[int, int, int, torch.Generator], dict[str, Callable[[], None]]]) -> str:
    """"onednn" where the `runs` ("torch" and "onednn" ways) of every `MEASURED_SHAPES` shape took `MIN_SPEEDUP`
    times longer in all through torch, else "torch", also where oneDNN's ops fail here."""
    seconds = {"torch": 0.0, "onednn": 0.0}
    generator = torch.Generator().manual_seed(0)
    try:
        for shape in MEASURED_SHAPES:
            for library, best in best_seconds(runs(*shape, generator)).items():
                seconds[library] += best
    except RuntimeError:  # oneDNN's private ops refuse this CPU or build: torch's GEMM it is
        return "torch"
    return "onednn" if seconds["torch"] >= MIN_SPEEDUP * seconds["onednn"] else "torch"


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T (+ bias)` through oneDNN, `packed` the weight as `torch.ops.mkldnn._reorder_linear_weight`
    laid it out (once, for many products)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _repeated(linear: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight: Tensor, times: int = 16) -> None:
    """A decode product `times` over: one 64-row product takes tens of microseconds, too short to time alone."""
    for _ in range(times):
        linear(x, weight)


def _three_products(linear: Callable[..., Tensor], x: Tensor, weight: Tensor, grad: Tensor) -> None:
    """A linear's forward and its input and weight gradients (`autograd.grad` with a given gradient: no more)."""
    torch.autograd.grad(linear(x, weight, None), (x, weight), grad)


def onednn_linear_available(packed_weights: bool = False) -> bool:
    """Whether the oneDNN fp32 linear path can run (`onednn_ops_available`) and is wanted here
    (`onednn_linear_preferred`)."""
    return onednn_ops_available() and onednn_linear_preferred(packed_weights)  # nothing measured without the ops


def matmul_transposed(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """`a @ b.T (+ bias)` for 2-D fp32 CPU tensors, through oneDNN; either may be a strided view. The op makes `a`
    contiguous (a transposed `a` is copied) and reads `b` as it is."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _SharedInput:
    """The input of linears fed the very same tensor one after the other (a Llama layer's q, k and v projections, its
    MLP's gate and up), and how their weight gradients dYᵀ X are best computed.

    Why: oneDNN's op makes its first operand contiguous, so dYᵀ X, as `matmul_transposed(dY.t(), X.t())`, copies dYᵀ
    [out, tokens] for every linear. The copy of a transposed [tokens, out] gradient is slow (cache-cold strided reads:
    4 ms for [1408, 2470] inside a GRPO step, where the product itself takes 8.5). Its transpose, Xᵀ dY, copies Xᵀ
    instead, which linears sharing an input copy once for all of them, and only the small [in, out] result is then
    transposed into the weight's layout. Which way costs fewer copied elements is decided per group (`swapped`)."""

    __slots__ = ("source", "version", "outputs", "transposed", "__weakref__")

    def __init__(self, x: Tensor) -> None:
        self.source, self.version = weakref.ref(x), x._version  # weakly: the input lives as long as its graphs use it
        self.outputs = 0  # the members' output features, summed
        self.transposed: Tensor | None = None  # Xᵀ during a backward pass that reads it

    def holds(self, x: Tensor) -> bool:
        """Whether `x` is this group's input tensor itself, unmodified since the group began."""
        return self.source() is x and self.version == x._version

    def join(self, out_features: int) -> _SharedInput:
        self.outputs += out_features
        return self

    def swapped(self, x: Tensor) -> bool:
        """Whether copying Xᵀ once [in, tokens] and transposing each member's [in, out] result copies fewer elements
        than copying each member's dYᵀ [out, tokens]."""
        tokens, features = x.shape
        return features * tokens + self.outputs * features < self.outputs * tokens

    def input_transposed(self, x: Tensor) -> Tensor:
        """Xᵀ contiguous [in, tokens]: copied by the first member's backward, dropped when the backward pass ends (also
        one that reaches only some members: `autograd.grad` of one weight, a member whose output the loss ignores)."""
        if self.transposed is None:
            self.transposed = x.t().contiguous()
            torch.autograd.Variable._execution_engine.queue_callback(self._drop)
        return self.transposed

    def _drop(self) -> None:
        self.transposed = None


_recent = threading.local()  # `group`: a weak reference to the last group a `OneDNNLinear` joined in this thread


def _input_group(x: Tensor, out_features: int) -> _SharedInput:
    """The group of `x`: the previous linear's if it was fed this very tensor, unmodified since, else a new one."""
    reference = getattr(_recent, "group", None)
    group = reference() if reference is not None else None
    if group is None or not group.holds(x):
        group = _SharedInput(x)
        _recent.group = weakref.ref(group)
    return group.join(out_features)


class _LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b on 2-D x, with all three products of forward and backward in oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, group: _SharedInput | None = None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.group = group  # None where no weight gradient was recorded for (a no-grad forward, a frozen weight)
        return matmul_transposed(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = matmul_transposed(grad, weight.t()) if ctx.needs_input_grad[0] else None   # dY W
        grad_w = None
        if ctx.needs_input_grad[1]:
            group = ctx.group or _SharedInput(x).join(weight.shape[0])  # alone (`_LinearFunction.apply` called as is)
            if group.swapped(x):  # (Xᵀ dY)ᵀ, Xᵀ copied once for the group
                grad_w = matmul_transposed(group.input_transposed(x), grad.t()).t().contiguous()
            else:
                grad_w = matmul_transposed(grad.t(), x.t())  # dYᵀ X
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _plain_cpu_fp32(t: Tensor) -> bool:
    # A DTensor (FSDP2's sharded parameter outside its forward) or another tensor subclass keeps torch's path.
    return type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32


class OneDNNLinear(torch.nn.Linear):
    """An `nn.Linear` whose fp32 CPU forward and backward run on oneDNN (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.numel() == 0 or not _plain_cpu_fp32(x) or not _plain_cpu_fp32(self.weight)
                or (self.bias is not None and not _plain_cpu_fp32(self.bias))
                or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        leading = x.shape[:-1]
        # The group is found on `x` itself: each linear reshapes it into a view object of its own.
        group = _input_group(x, self.out_features) if torch.is_grad_enabled() and self.weight.requires_grad else None
        y = _LinearFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, group)
        return y.reshape(*leading, self.out_features)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Swap every plain `nn.Linear` of `model` (in place) for `OneDNNLinear`; returns how many were swapped.
    Idempotent; does nothing where oneDNN's ops are missing or `POSTTRAIN_ONEDNN=0`."""
    if not onednn_linear_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear
            swapped += 1
    return swapped


def use_torch_linears(model: torch.nn.Module) -> int:
    """Undo `use_onednn_linears`: every `OneDNNLinear` of `model` back to a plain `nn.Linear` (torch's own GEMM,
    e.g. for a baseline that must run as transformers ships it); returns how many."""
    restored = 0
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = torch.nn.Linear
            restored += 1
    return restored
