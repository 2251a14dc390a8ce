"""Attention under bf16 autocast on a CPU: per shape, the fastest of torch's kernel in bf16, in fp32, or two GEMMs.

Why: torch's CPU attention (SDPA's flash kernel) runs its forward faster in bf16 than in fp32 at every shape
measured, but its backward in bf16 has a large cost per (row, head) block that fp32 does not pay. At short
rows and small heads the bf16 forward + backward is 2-5x *slower* than fp32 (Intel Xeon with AMX, torch 2.13,
2 threads; one layer's attention, ms):

| rows x heads x tokens x head dim | fp32 | bf16 |
|---|---:|---:|
| 32 x 4 x 128 x 32 (the tiny model's pretraining) | 13 | 47 |
| 32 x 8 x 128 x 64 | 57 | 111 |
| 16 x 8 x 256 x 64 | 78 | 79 |
| 4 x 8 x 1024 x 64 | 176 | 89 |

On the tiny model this made a bf16 pretraining step slower than fp32 (0.41 vs 0.38 s) although its GEMMs ran
2.7x faster; with attention in fp32 the bf16 step is 1.5x faster than fp32 (0.24 vs 0.37 s). At these short
rows two batched GEMMs with the softmax between them (`models.matmul_attention`: fp32 scores, bf16
probabilities times values, the bf16 kernel's precision) are faster still: 1.2-1.6x the better flash precision
on a Zen 5 EPYC at fine-tuning and RL shapes; the flash kernel wins again at long rows (512 tokens and up).

`use_cpu_attention(model)` switches a model whose attention is transformers' "sdpa" to `ATTENTION`, which is
transformers' SDPA with one difference: under CPU bf16 autocast it runs the kernel measured fastest at the
shape (`kernel`): "bf16", transformers' SDPA as autocast runs it; "fp32", the same on fp32 copies of query, key
and value (autocast off), the output handed back in bf16; "matmul", `models.matmul_attention` (bf16 output too).
Everywhere else (fp32 runs, GPUs, no autocast) it is transformers' SDPA as it is. The choice is per shape (rows
and tokens rounded up to a power of two, heads, head dim, the mask's kind), the same whether gradients are on or
not: pi_old's and the reference's no-grad passes then compute exactly what the update's forward does on the same
micro-batch (a first update's ratio of exactly 1 needs that).

Which is faster is measured, not assumed: the first time a shape's bucket is seen, each kernel runs forward +
backward on random inputs of that bucket (a few ms to a second, once), and the answer is kept in memory and in
a per-machine file (`models.machine_choices`, keyed by CPU, torch version and thread count), so a run resumed in
a new process makes the same choice and stays bitwise. `POSTTRAIN_CPU_ATTENTION=fp32`, `bf16` or `matmul` fixes
the choice (`bf16`: torch's kernel as it is; `matmul` within `MAX_SCORES`, bf16 beyond); `auto` (the default)
measures.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from posttrain.models import matmul_attention, prefix_attention
from posttrain.models.attention import sliding_window
from posttrain.models.machine_choices import best_seconds, measured_choice
from posttrain.models.precision import autocast_dtype

ATTENTION = "posttrain_sdpa"
KERNELS = ("fp32", "bf16", "matmul")
CHOICES = ("auto", *KERNELS)
# Rows of whole samples (or of shared prompts) at most this wide keep the dense mask: one attention call per layer
# over W^2 pairs costs less there than the tree's calls per length bucket with their gathers. The small model's
# forward + backward of shared-prompt DPO micro-batches on a Zen 5 EPYC, tree against dense mask: rows of 241 tokens
# bf16 233-243 vs 202 ms, fp32 310-319 vs 297-315; of 314 level; of 453 bf16 730-735 vs 817-829, fp32 1,052-1,094
# vs 1,223-1,256; rows of whole samples, 230 tokens level, 691 tokens bf16 1,152-1,173 vs 1,567-1,940. A fixed
# estimate from one CPU and the small model, not measured per machine as the kernels are.
SAMPLE_TREE_MIN_WIDTH = 320


def _forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
             **kwargs) -> tuple[Tensor, None]:
    """transformers' SDPA; under CPU bf16 autocast, the kernel measured fastest at this shape (`kernel`); over a
    padding-free RL batch's prompts and completions only where the forward passes their `PrefixTree`."""
    tree = kwargs.pop(prefix_attention.KEYWORD, None)
    if prefix_attention.applies(tree, query, kwargs):
        return prefix_attention.prefix_tree_attention(_forward, module, query, key, value, tree, **kwargs)
    if prefix_attention.is_unmaterialised(attention_mask):
        raise RuntimeError(f"{type(module).__name__} cannot compute this padding-free forward from its prefix tree "
                           f"and it has no dense mask (the layer got {sorted(kwargs)}): set update.share_prompts=false")
    # A float64 (or float16) model's attention is left to autocast, which leaves it in its own dtype: fp32 copies
    # here would hand a bf16 output to its float64 output projection.
    chosen = "bf16"  # transformers' SDPA as it is, under autocast or not
    if (query.device.type == "cpu" and autocast_dtype("cpu") == torch.bfloat16
            and query.dtype in (torch.float32, torch.bfloat16)):
        chosen = kernel(query, key, attention_mask)
    return _run(chosen, module, query, key, value, attention_mask, **kwargs)


def _run(chosen: str, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
         attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """The attention by the `chosen` kernel (one of `KERNELS`)."""
    if chosen == "matmul" and matmul_attention.handles(attention_mask, **kwargs):
        # bf16 values: the probabilities-times-values product in bf16, as autocast's SDPA would compute it
        value = value.to(torch.bfloat16, memory_format=torch.contiguous_format)  # one copy of an fp32 value, not two
        return matmul_attention.attention(module, query, key, value, attention_mask, **kwargs)
    if chosen != "fp32":  # bf16, or a call the matmul path does not compute (dropout, a position bias)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    # Query and key arrive in fp32 or bf16 (rotary embeddings promote them to the residual stream's dtype);
    # autocast would run SDPA on bf16 copies and return bf16: here fp32 copies, and the same bf16 output dtype.
    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                 **kwargs)
    return output.to(torch.bfloat16), weights


AttentionInterface.register(ATTENTION, _forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the layers' masks are built exactly as for "sdpa"


def use_cpu_attention(model: torch.nn.Module) -> int:
    """Switch every transformers model inside `model` (a causal LM, a peft wrapper's base, a reward model's
    trunk) whose attention is "sdpa" to `ATTENTION`; returns how many were switched. Saved configs do not
    keep the choice (transformers does not write it), so saved models load anywhere as plain "sdpa" ones."""
    switched = 0
    for module in model.modules():
        if (isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa"
                and module._can_set_attn_implementation()):
            module.set_attn_implementation(ATTENTION)
            switched += 1
    return switched


def takes_prefix_tree(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention computes a padding-free RL forward from its `PrefixTree`: every transformers
    model inside it (a causal LM, a peft wrapper's base, a critic) runs `ATTENTION` on the CPU without a sliding
    window. Its padding-free passes then keep a prompt's group whole in one row (`rollout.recompute.packing_units`):
    through the tree a row's width costs attention nothing."""
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    return bool(models) and all(m.config._attn_implementation == ATTENTION and m.device.type == "cpu"
                                and sliding_window(m.config.get_text_config()) is None for m in models)


def tree_keywords(model: torch.nn.Module,
                  tree: Callable[[], prefix_attention.PrefixTree] | None) -> dict[str, Any]:
    """The keywords that hand a padding-free RL forward's `PrefixTree` (built by `tree()` only here) to `model`'s
    attention: {} without one, or unless the model takes it (`takes_prefix_tree`). The keyword reaches the attention
    function through forwards that pass extra keywords on, as transformers' do; a forward that drops it leaves the
    attention on the dense mask it also gets."""
    return {prefix_attention.KEYWORD: tree()} if tree is not None and takes_prefix_tree(model) else {}


def sample_tree_keywords(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """`tree_keywords` for a packed or padding-free batch of `data.collate.collate_packed` (whole samples side by side
    in rows, `sample_ids`, a block-causal 4-D mask): each sample's attention causally over itself
    (`PrefixTree.of_samples`), so that it costs the samples' lengths squared rather than the rows' width squared; or
    of `collate_shared_prompts` (`segment_ids`, `parent_ids`): each shared prompt once, its sequences' own tokens over
    it (`PrefixTree.of_segments`). {} for other batches, and for rows no wider than `SAMPLE_TREE_MIN_WIDTH`."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 4 or mask.shape[-1] <= SAMPLE_TREE_MIN_WIDTH:
        return {}
    if "parent_ids" in batch:
        return tree_keywords(model, lambda: prefix_attention.PrefixTree.of_segments(
            batch["segment_ids"], batch["parent_ids"], mask.dtype))
    if "sample_ids" not in batch or "position_ids" not in batch:
        return {}
    return tree_keywords(model, lambda: prefix_attention.PrefixTree.of_samples(batch["sample_ids"],
                                                                              batch["position_ids"]))


def attention_choice() -> str:
    choice = os.environ.get("POSTTRAIN_CPU_ATTENTION", "auto")
    if choice not in CHOICES:
        raise ValueError(f"POSTTRAIN_CPU_ATTENTION must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def _bucket(query: Tensor, key: Tensor, attention_mask: Tensor | None) -> tuple:
    """The shape a choice is measured at: rows and tokens rounded up to a power of two (padding-free batches have
    a different number of rows almost every step), heads, head dim and the mask's kind as they are."""
    rows, heads, queries, head_dim = query.shape
    mask = "none" if attention_mask is None else str(attention_mask.dtype).removeprefix("torch.")
    return _round_up(rows), heads, key.shape[1], _round_up(queries), _round_up(key.shape[2]), head_dim, mask


def _round_up(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def kernel(query: Tensor, key: Tensor, attention_mask: Tensor | None) -> str:
    """The fastest way to run this shape's attention under bf16 autocast on this CPU (forward + backward): "fp32"
    (the flash kernel on fp32 copies), "bf16" (the flash kernel as autocast runs it) or "matmul"
    (`models.matmul_attention`, only where its scores are small: `MAX_SCORES`)."""
    choice = attention_choice()
    bucket = _bucket(query, key, attention_mask)
    rows, heads, _, queries, keys, _, _ = bucket
    small = rows * heads * queries * keys <= matmul_attention.MAX_SCORES
    if choice != "auto":
        return choice if choice != "matmul" or small else "bf16"  # the cap holds for a fixed choice too
    kernels = KERNELS if small else KERNELS[:2]
    # the kernels (and the GEMM kernel's revision, where it is offered) in the key: a choice measured before a kernel
    # was added or changed is measured again, not read back
    revision = f"|matmul r{matmul_attention.REVISION}" if "matmul" in kernels else ""
    name = f"attention|{'/'.join(kernels)}{revision}|{'x'.join(map(str, bucket))}"
    return measured_choice(name, kernels, lambda: _measure(bucket, kernels))


def _measure(bucket: tuple, kernels: tuple[str, ...] = KERNELS) -> str:
    """The fastest of `kernels` for a causal attention of `bucket`'s shape, forward + backward, each run as `_forward`
    runs it under bf16 autocast, on the inputs a Llama-like layer hands it there: query and key in fp32 (the rotary
    embedding promotes them), value in bf16, a float mask in its kind's dtype."""
    rows, heads, kv_heads, queries, keys, head_dim, mask_kind = bucket
    generator = torch.Generator().manual_seed(0)
    # its own tensors with autograd on, whatever mode the forward that asks runs in (no_grad, inference_mode: an
    # inference tensor, the mask included, cannot be saved for a backward)
    with torch.inference_mode(False), torch.enable_grad():
        # Contiguous, although a Llama layer hands over transposed views: timed on views, the GEMM kernel's copies
        # add temporaries whose pages glibc maps afresh between calls, and its best of three swung 5.8-8.7 ms at 2 x 8
        # x 256^2 (the flash kernels 6.0-6.5) where the DPO benchmark's micro-batches ran 7% faster with it than
        # with the fp32 flash kernel (benchmarks/README, thirteenth session).
        q = torch.randn(rows, heads, queries, head_dim, generator=generator, requires_grad=True)
        k = torch.randn(rows, kv_heads, keys, head_dim, generator=generator, requires_grad=True)
        v = torch.randn(rows, kv_heads, keys, head_dim, generator=generator, dtype=torch.bfloat16, requires_grad=True)
        mask = None
        if mask_kind != "none":
            allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]
            mask_dtype = getattr(torch, mask_kind)
            mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(
                ~allowed, torch.finfo(mask_dtype).min)
        grad = torch.randn(rows, queries, heads, head_dim, generator=generator, dtype=torch.bfloat16)  # a dense one
    runs = {way: functools.partial(_forward_backward, way, _Shape(heads // kv_heads), q, k, v, mask, grad)
            for way in kernels}
    return min(kernels, key=best_seconds(runs).get)


def _forward_backward(way: str, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                      grad: Tensor) -> None:
    with torch.inference_mode(False), torch.enable_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, _ = _run(way, module, q, k, v, mask)
        output.backward(grad)


class _Shape(torch.nn.Module):
    """What transformers' SDPA reads from an attention module: its GQA group size and causality."""

    def __init__(self, num_key_value_groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = num_key_value_groups, True
