"""Attention as batched matrix products, for the CPU under bf16 autocast: scores and softmax in fp32, the
probabilities times the values in bf16; in the backward dP in fp32, the query's and key's gradients as bf16 products.

Why: torch's CPU attention kernel (SDPA's flash kernel) pays a fixed cost per block of (row, head) that dominates
at the short sequences of fine-tuning and RL, most of all in its bf16 backward. Two batched GEMMs per direction
do the same work in less time there. Forward + backward of one layer as `cpu_attention` measures it (query and key
fp32, value bf16, as a Llama layer hands them over under autocast), AMD EPYC Zen 5, 2 threads, ms, with the
backward's products all in fp32 (revision 1; revision 2's bf16 dQ and dK are faster still, see Precision below):

| rows x heads x queries x keys, head dim | flash fp32 | flash bf16 | matmul |
|---|---:|---:|---:|
| 64 x 8 x 32 x 128, 64, a float mask (GRPO completions against their prompt) | 32.5 | 31.5 | 26.2 |
| 16 x 8 x 128 x 128, 64, a boolean mask (a padded SFT batch) | 18.6 | 27.5 | 12.6 |
| 32 x 4 x 128 x 128, 32, causal (the tiny model's pretraining) | 12.3 | 22.1 | 7.5 |
| 4 x 8 x 256 x 256, 64, causal | 13.9 | 13.7 | 11.0 |
| 4 x 8 x 512 x 512, 64, causal | 52.4 | 44.0 | 76.5 |

At long sequences the flash kernel wins: `cpu_attention` measures which to run per shape on each machine. In a
whole bf16 step of the small model (16 padded rows of 128 tokens, forward + backward) attention through this was
1-6% faster than through the better flash precision (alternated in one process: median 658 vs 698 ms, best 628 vs
636).

Precision: the bf16 flash kernel takes bf16 copies of query, key and value and accumulates in fp32. Here q·kᵀ is an
fp32 product of the query and key as they arrive (fp32 from a Llama layer's rotary embedding under autocast), the
softmax is fp32, and P·V multiplies the bf16-rounded probabilities with the bf16 values, as the flash kernel's bf16
path does. In the backward dP = dO·vᵀ is fp32 too (dP - sum_j P_j dP_j cancels its leading digits), and the query's
and key's gradients, dS·k and dSᵀ·q, are bf16 products of bf16-rounded operands, as in the flash kernel's backward
(in fp32 they cost 3-4x as much: 0.65 against 0.15-0.19 ms each at 2 x 8 x 241^2 scores; the small model's bf16
forward + backward of the DPO benchmark's micro-batches, alternated in one process: median 179 against 190 ms).
Against float64 its relative errors measured below the bf16 flash kernel's (output 2.9e-3 vs 4.1e-3, query gradient
4.3e-3 vs 5.3e-3, 3.2e-3 with fp32 products), and within 1.15x of them where the softmax backward cancels (nearly
equal value rows); the tests hold it within 1.25x of the flash kernel's. In float64 (the tests' references) every
product is float64.

Memory: for the backward it keeps query and key in their dtype (fp32 from a Llama layer), key and value after
grouped-query heads are repeated (as transformers' SDPA path repeats them), each copied contiguous, the output, and
the probabilities in bf16 (2 bytes a score, which the values' gradient needs in bf16 anyway; recomputing them instead
was 1.2-1.4x slower); fp32 scores live within one call. `cpu_attention` offers this path only where the scores are small
(`MAX_SCORES`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import repeat_kv

# Score elements (rows x heads x queries x keys) of the largest call this path is offered for: 32 MiB of fp32
# scores live at once in a forward, a few times that in a backward.
MAX_SCORES = 1 << 23
# Raised whenever what this kernel costs changes (2: dQ and dK as bf16 products; 3: its inputs copied into [B, H, L,
# D] order once): `cpu_attention`'s per-machine choices name it, so that a choice measured against an older revision
# is measured again rather than read back.
REVISION = 3


def handles(attention_mask: Tensor | None, dropout: float = 0.0, **kwargs) -> bool:
    """Whether `attention` computes what transformers' SDPA would for this call: no attention dropout, no learned
    bias (a mask that needs gradients, a position bias), no soft-capping or attention sinks."""
    return (not dropout and (attention_mask is None or not attention_mask.requires_grad)
            and all(kwargs.get(name) is None for name in ("softcap", "s_aux", "position_bias")))


def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              scaling: float | None = None, is_causal: bool | None = None, **_: object) -> tuple[Tensor, None]:
    """transformers' attention-function contract, as its SDPA computes it (grouped-query heads repeated, causal
    when a multi-token query comes without a mask, a boolean mask's False and a float mask's -inf hidden, a query
    that sees no key gets zeros): query [B, H, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv] -> output
    [B, L, H, Dv] in the value's dtype, and no weights. The caller checks `handles` first."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # A Llama layer hands query, key and value over as transposed views of [B, L, H, D] tensors (a prefix tree's
    # gathers too). Copied once into [B, H, L, D] order here, every product below reads them as they are; otherwise
    # torch.matmul copies each 4-D view into a 3-D batch at every use, forward and backward (a layer's forward +
    # backward over a GRPO batch's prefix tree, bf16, alternated in one process: 40 against 51 ms).
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    queries, keys = query.shape[2], key.shape[2]
    scores_dtype = torch.promote_types(query.dtype, torch.float32)
    if attention_mask is None and causal and queries > 1:
        # SDPA's is_causal: query i sees keys 0..i (aligned top-left, as torch's kernel does)
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril()
        bias = _additive(allowed, scores_dtype)
    elif attention_mask is None:
        bias = None
    elif attention_mask.dtype == torch.bool:
        bias = _additive(attention_mask, scores_dtype)
    else:
        bias = attention_mask.to(scores_dtype)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = _MatmulAttention.apply(query, key, value, bias, scale)
    return output.transpose(1, 2).contiguous(), None


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _probabilities(query: Tensor, key: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """softmax(q kᵀ · scale + bias) [B, H, L, S] in fp32 (or the inputs' wider dtype); a query whose every key is
    hidden (-inf) gets probabilities 0, so its output is zeros, as SDPA's (a NaN from anything else stays NaN)."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)).mul_(scale)
    if bias is None:
        return scores.softmax(-1)
    probabilities = scores.add_(bias).softmax(-1)
    sees_nothing = (bias == float("-inf")).all(-1, keepdim=True)  # [.., L, 1], on the bias: heads broadcast
    return probabilities.masked_fill_(sees_nothing, 0.0) if sees_nothing.any() else probabilities


class _MatmulAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v with the gradients of query, key and value (the bias is a constant). Keeps the
    probabilities in the values' dtype (bf16: 2 bytes a score), which the values' gradient needs in that dtype anyway,
    and the output, for the backward."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, scale: float) -> Tensor:
        with torch.autocast(query.device.type, enabled=False):
            probabilities = _probabilities(query, key, bias, scale).to(value.dtype)
            output = torch.matmul(probabilities, value)
        ctx.save_for_backward(query, key, value, probabilities, output)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        query, key, value, probabilities, output = ctx.saved_tensors
        needs_query, needs_key, needs_value = ctx.needs_input_grad[:3]
        dtype = torch.promote_types(query.dtype, torch.float32)  # the scores' dtype
        grad_query = grad_key = grad_value = None
        with torch.autocast(query.device.type, enabled=False):
            if needs_value:
                grad_value = torch.matmul(probabilities.transpose(-1, -2), grad_output.to(value.dtype))
            if needs_query or needs_key:
                # softmax's backward, dS = P * (dP - sum_j P_j dP_j), with sum_j P_j dP_j = dO · O (per query:
                # [.., L, 1] from [L, Dv] tensors instead of [L, S] ones, as flash kernels compute it), then the
                # scores' scale. dP in the scores' dtype: in bf16 the subtraction would cancel its leading digits.
                grad_output = grad_output.to(dtype)
                row_dot = (grad_output * output.to(dtype)).sum(-1, keepdim=True)
                grad_scores = torch.matmul(grad_output, value.to(dtype).transpose(-1, -2))
                grad_scores = grad_scores.sub_(row_dot).mul_(probabilities).mul_(ctx.scale)
                # dQ = dS k and dK = dSᵀ q as products in the values' dtype (bf16 under autocast: dS, q and k rounded
                # to it, fp32 accumulation, a bf16 result), as the flash kernel's bf16 backward computes them (see
                # the module's docstring: precision and cost).
                grad_scores = grad_scores.to(value.dtype)
                if needs_query:
                    grad_query = torch.matmul(grad_scores, key.to(value.dtype)).to(query.dtype)
                if needs_key:  # in bf16 dSᵀ q (transposed first operand) measured faster than (qᵀ dS)ᵀ: 0.19 vs 0.21 ms
                    grad_key = torch.matmul(grad_scores.transpose(-1, -2), query.to(value.dtype)).to(key.dtype)
        return grad_query, grad_key, grad_value, None, None
