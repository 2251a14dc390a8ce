"""Llama-style MLP and RMSNorm layers that keep less for the backward pass, with bit-identical results.

Why: a training step's peak memory is mostly what autograd keeps between forward and backward. transformers'
`LlamaMLP` computes `down(silu(gate(x)) * up(x))`: autograd keeps `gate(x)` (for silu's gradient) *and*
`silu(gate(x))` (for the product's), although the second is one elementwise op away from the first. Its
`LlamaRMSNorm` computes `weight * (x * rsqrt(mean(x²) + eps))`: autograd keeps `x`, the one-per-row rsqrt *and*
the normalised `x * rsqrt(...)` (for the weight's gradient), again one elementwise op away. On the small model at
16 x 128 tokens those two tensors are 156 of the 693 MB autograd keeps (the MLP's 1408-wide activation in each of
8 layers, the 512-wide normalised input of 17 norms).

`use_lean_layers(model)` gives every such module of a model (in place, by class, like `models.onednn`) a forward
through an autograd function that keeps only `gate(x)` and `up(x)` (the MLP) or `x` and the rsqrt (the norm),
and recomputes the rest in the backward. The MLP's product `silu(gate(x)) * up(x)`, which `down_proj` keeps for its
weight's gradient, is computed again from those two as well (saved-tensor hooks around `down_proj`, so it may be
any module: a LoRA layer, oneDNN's linear); on the small model at 16 x 97 tokens that is 67 of the 406 MB autograd
kept. The forward runs transformers' ops in transformers' order, and the backward runs the ops torch's autograd
runs for the original graph, in the same order and with gradients handed back in the order autograd would have
summed them: losses and gradients are bitwise those of the module as transformers ships it (tested in fp32 and
under bf16 autocast, and for bf16 weights), at the cost of a few elementwise ops per layer in the backward (within
the host's noise: a forward and backward of that batch 2.26 against 2.32 s, medians of 8 alternated pairs).

Which modules: a module's class must have exactly the forward of transformers' `LlamaMLP` (with a SiLU
activation) or of `LlamaRMSNorm` -- compared as compiled code against copies kept here -- which the
"Copied from Llama" classes of Mistral, Qwen2, Qwen3 and others have too. A class whose forward differs (another
transformers version, a hub kernel, a model with other arithmetic) keeps its own forward: it is never replaced
by something that computes differently. `POSTTRAIN_LEAN_LAYERS=0` turns this off.
"""

from __future__ import annotations

import functools
import os
import types

import torch
from torch import Tensor, nn
from torch.nn import functional as F


# The forwards of transformers' LlamaMLP and LlamaRMSNorm (5.x), verbatim: a class qualifies when its forward
# compiles to the same code (names, constants and instructions).
def _transformers_mlp_forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _transformers_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _same_code(function: object, reference: types.FunctionType) -> bool:
    code, expected = getattr(function, "__code__", None), reference.__code__
    return code is not None and all(getattr(code, field) == getattr(expected, field) for field in (
        "co_code", "co_names", "co_consts", "co_varnames", "co_argcount", "co_kwonlyargcount"))


class SiluTimes(torch.autograd.Function):
    """`silu(gate) * up`, keeping `gate` and `up` for the backward (not also `silu(gate)`)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        # Autograd's graph: MulBackward0 (grad * other for each side), then SiluBackward0 (aten.silu_backward).
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class RMSNormWeighted(torch.autograd.Function):
    """`weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)` with x32 = x in fp32, keeping `x` and the rsqrt.

    The input arrives twice (`x` and `x_again`, the same tensor) so that, for an fp32 input, the two gradients
    autograd would have added into x's buffer one after the other (the normalising product's first, then the
    square's) are still handed back as two and summed by autograd in that order, after whatever else x's
    buffer already holds (the residual stream's gradient): the same additions in the same order."""

    @staticmethod
    def forward(ctx, x: Tensor, x_again: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.to(torch.float32)
        rsqrt = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rsqrt, weight)
        return weight * (x32 * rsqrt).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, rsqrt, weight = ctx.saved_tensors
        x32 = x.to(torch.float32)
        normalised = (x32 * rsqrt).to(x.dtype)
        # Autograd casts each gradient to its input's dtype (a no-op where all are alike), then sums it to the
        # input's shape where the forward broadcast. Every product keeps autograd's operand order: the layout of
        # a result follows its first operand, and a sum over a tensor of another layout adds in another order.
        grad_weight = ((grad * normalised).to(weight.dtype).sum_to_size(weight.shape) if ctx.needs_input_grad[2]
                       else None)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, grad_weight, None
        grad_normalised = (grad * weight).to(normalised.dtype).to(torch.float32)
        grad_by_product = grad_normalised * rsqrt
        grad_rsqrt = (grad_normalised * x32).sum_to_size(rsqrt.shape)
        grad_mean = -0.5 * grad_rsqrt * rsqrt.pow(3)
        # pow's backward: grad * (2 * x.pow(1)), and x.pow(1) is x
        grad_by_square = (grad_mean.expand(x32.shape) / x32.shape[-1]) * (2.0 * x32)
        if x.dtype == torch.float32:
            return grad_by_product, grad_by_square, grad_weight, None
        # x.to(fp32) is one node in autograd's graph: it sums both in fp32 and casts once.
        return (grad_by_product + grad_by_square).to(x.dtype), None, grad_weight, None


def _lean_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return self.down_proj(F.silu(gate) * up)
    product = SiluTimes.apply(gate, up)
    if not _recipe_applies(product):
        return self.down_proj(product)
    # down_proj keeps its input for its weight's gradient; SiluTimes keeps gate and up, from which that input is one
    # elementwise op away: down_proj keeps a recipe instead, and the backward computes it again.
    recipe = _ProductRecipe(product, gate, up)
    with torch.autograd.graph.saved_tensors_hooks(recipe.pack, _ProductRecipe.unpack):
        return self.down_proj(product)


def _recipe_applies(product: Tensor) -> bool:
    """Whether down_proj may keep a recipe for `product`. Not for a tensor without an address of its own to know its
    views by (a tensor subclass such as DTensor or FakeTensor, a meta tensor, an empty one), not under torch.compile
    (no saved-tensor hooks there; it recomputes cheap elementwise ops itself), and not where saved tensors already go
    through someone else's hooks: non-reentrant gradient checkpointing (which keeps none of the layer's tensors, where
    a recipe would keep gate and up alive), offloading (which moves them off the device the recipe would hold them
    on), or hooks switched off (functorch's transforms), where adding some raises. Where torch cannot say (private
    functions, checked for), no recipe."""
    if (type(product) is not Tensor or product.device.type == "meta" or product.numel() == 0
            or torch.compiler.is_compiling()):
        return False
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    disabled = getattr(autograd, "_saved_tensors_hooks_get_disabled_error_message", None)
    if top is None or disabled is None:
        return False
    try:
        return disabled() is None and top(False) is None
    except TypeError:  # another signature in another torch
        return False


class _ProductRecipe:
    """Saved-tensor hooks for down_proj's call. The MLP's product `silu(gate) * up` (or a view of it), which down_proj
    saves for its backward, is kept as how to compute it again: the same op on the same `gate` and `up`, which
    SiluTimes keeps anyway, so bitwise the tensor the forward made (the same elementwise kernels on as many threads).
    Anything else down_proj saves is kept as autograd keeps it: detached unless a leaf (an op's own output, kept with
    the node that saves it, would be a reference cycle; autograd gives it its node back on unpacking), and checked for
    in-place changes on unpacking, which autograd does not do for tensors that hooks pack."""

    def __init__(self, product: Tensor, gate: Tensor, up: Tensor) -> None:
        self.address, self.offset = product.untyped_storage().data_ptr(), product.storage_offset()
        self.version, self.dtype, self.device = product._version, product.dtype, product.device
        self.inputs = ((gate, gate._version), (up, up._version))

    def pack(self, tensor: Tensor) -> tuple:
        # The product as it was made: a tensor changed in place since (its version moved) is kept as it is.
        if (type(tensor) is Tensor and tensor.dtype == self.dtype and tensor.device == self.device
                and tensor.untyped_storage().data_ptr() == self.address and tensor._version == self.version):
            return self, tensor.size(), tensor.stride(), tensor.storage_offset() - self.offset
        return tensor if tensor.is_leaf else tensor.detach(), tensor._version

    @staticmethod
    def unpack(packed: tuple) -> Tensor:
        if not isinstance(packed[0], _ProductRecipe):
            tensor, version = packed
            _check_unchanged(tensor, version)
            return tensor
        recipe, size, stride, offset = packed
        for tensor, version in recipe.inputs:
            _check_unchanged(tensor, version)
        (gate, _), (up, _) = recipe.inputs
        with torch.no_grad():
            return (F.silu(gate) * up).as_strided(size, stride, offset)


def _check_unchanged(tensor: Tensor, version: int) -> None:
    """autograd's own check, in its words: a tensor kept for the backward must not have changed since."""
    if tensor._version != version:
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: a tensor of shape {list(tensor.shape)} is at version {tensor._version}; "
                           f"expected version {version} instead")


def _lean_rms_norm_forward(self, hidden_states):
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
        return RMSNormWeighted.apply(hidden_states, hidden_states, self.weight, self.variance_epsilon)
    return _transformers_rms_norm_forward(self, hidden_states)


_LEAN_FORWARDS = {"mlp": _lean_mlp_forward, "rms_norm": _lean_rms_norm_forward}


def _reduce_lean(self, protocol):
    # Pickled (torch.save of a whole model, copy.deepcopy) as "a new lean module of this base class", since the
    # class made here cannot be found by name; the rest is the base class's own state.
    reduced = object.__reduce_ex__(self, protocol)
    return (_new_lean_module, (type(self).lean_base, type(self).lean_kind), *reduced[2:])


@functools.cache
def _lean_class(cls: type, kind: str) -> type:
    """`cls` with the lean forward of `kind`; same name, so a printed model reads as before."""
    return type(cls.__name__, (cls,), {"forward": _LEAN_FORWARDS[kind], "__module__": cls.__module__,
                                       "__reduce_ex__": _reduce_lean, "lean_base": cls, "lean_kind": kind})


def _new_lean_module(cls: type, kind: str) -> nn.Module:
    lean = _lean_class(cls, kind)
    return lean.__new__(lean)


def _transformers_silu_forward(self, input: Tensor) -> Tensor:
    return nn.functional.silu(input)


def _silu_activation(module: nn.Module) -> bool:
    """Whether the module's `act_fn` is torch's SiLU or transformers' `SiLUActivation` (as compiled code)."""
    act = getattr(module, "act_fn", None)
    return type(act) is nn.SiLU or (isinstance(act, nn.Module) and _same_code(type(act).forward,
                                                                           _transformers_silu_forward))


def lean_layers_enabled() -> bool:
    return os.environ.get("POSTTRAIN_LEAN_LAYERS", "1") != "0"


def use_lean_layers(model: nn.Module) -> int:
    """Give every Llama-style MLP (SiLU) and RMSNorm of `model` the lean forward (in place); returns how many.
    Idempotent; does nothing with `POSTTRAIN_LEAN_LAYERS=0`."""
    if not lean_layers_enabled():
        return 0
    swapped = 0
    for module in model.modules():
        cls = type(module)
        if "lean_kind" in cls.__dict__:
            continue
        if _same_code(cls.forward, _transformers_mlp_forward) and _silu_activation(module):
            module.__class__ = _lean_class(cls, "mlp")
        elif _same_code(cls.forward, _transformers_rms_norm_forward):
            module.__class__ = _lean_class(cls, "rms_norm")
        else:
            continue
        swapped += 1
    return swapped
