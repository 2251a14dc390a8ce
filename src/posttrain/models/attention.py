"""The attention mask a padding-free or packed forward gives a model, sliding windows included.

A padded forward hands transformers a 2-D mask, and transformers builds each layer's mask from it,
cutting a sliding window into the layers that have one (Mistral, Qwen2 with use_sliding_window,
every other layer of Gemma2). A padding-free or packed forward hands it a 4-D block-causal mask
(`posttrain.data.collate.block_causal_mask`, `posttrain.rollout.recompute.pack_rollout`), and
transformers uses a 4-D mask as it is, in every layer: the window is silently dropped, and a
windowed model's logprobs are off wherever a sample is longer than its window.

`layer_attention_mask` cuts the window in itself. transformers' rule is that query q sees key k iff
q - k < window, counted in the padded row's columns; a sample's tokens are consecutive columns of
its padded row, so the same rule counted in `position_ids` (which restart at every sample and, with
shared prompts, continue from the prompt into each completion) hides exactly the same keys. Models
whose layers differ (`config.layer_types`: Gemma2/3, Qwen2/3 with max_window_layers) take one mask
per layer type, a dict their forward uses as given; models without layer types that have a window
(Mistral, Mixtral, Phi-3, Starcoder2) apply it in every layer, and get the windowed mask.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from posttrain.errors import ConfigError

LAYER_TYPES = ("full_attention", "sliding_attention")


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sliding_window(config: Any) -> int | None:
    """The window of `config`'s windowed layers, or None when no layer has one."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def windowed(attention_mask: Tensor, position_ids: Tensor, window: int) -> Tensor:
    """`attention_mask` [R, 1, T, T] (additive, or boolean with True = attend) with every key `window` or
    more positions before its query hidden as well."""
    distance = position_ids[:, :, None] - position_ids[:, None, :]  # [R, T (query), T (key)]
    outside = (distance >= window)[:, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~outside
    return attention_mask.masked_fill(outside, torch.finfo(attention_mask.dtype).min)


@functools.cache
def _forward_takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


def takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether the transformers model inside `model` (itself, a peft wrapper's base, a reward model's trunk), and
    the trunk it runs (`base_model`), take `position_ids`. Those that do not (Bloom and MPT, whose ALiBi biases
    count positions along the 2-D mask; Mamba, RWKV) cannot restart positions at every sample of a packed row. A
    head built over a trunk (`models.reward`'s generated classifiers) takes them whatever its trunk does."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return inner is None or all(_forward_takes_position_ids(type(m)) for m in (inner, inner.base_model))


def packing_obstacle(model: torch.nn.Module) -> str | None:
    """Why `model` cannot take padding-free or packed batches (samples side by side in a row, kept apart by a 4-D
    block mask and position_ids that restart at each), or None when it can."""
    config = _text_config(model)
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES))
    if unknown:
        return (f"padding-free and packed batches need full or sliding-window attention in every layer; this "
                f"{config.model_type} model has {', '.join(unknown)} layers")
    if not takes_position_ids(model) or getattr(config, "alibi", False):
        # Falcon with ALiBi takes position_ids but builds its ALiBi bias from a 2-D mask (a 4-D one is a crash).
        return (f"padding-free and packed batches restart position_ids at every sample; this {config.model_type} "
                "model takes none (its positions come from the 2-D attention mask)")
    return None


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest sequence a model with a learned table of absolute positions can take (GPT-2's `wpe`, OPT's
    `embed_positions`), or None for positions without a table (RoPE, ALiBi), which have no hard limit: the config's
    n_positions / max_position_embeddings where an embedding of the text model (not its input embeddings) has
    exactly that many rows (OPT's 2 more, its `offset`)."""
    config = _text_config(model)
    declared = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(declared, int):
        return None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = (m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not inputs)
    return declared if any(t.num_embeddings - int(getattr(t, "offset", 0)) == declared for t in tables) else None


def rope_switch_length(model: torch.nn.Module) -> int | None:
    """The length past which the model's rotary frequencies depend on the longest sequence of a forward, or None
    where they never do. Dynamic NTK scaling rescales once a forward is longer than max_position_embeddings, and
    Phi-3's longrope switches to its long factors past original_max_position_embeddings: beyond that length the
    same sequence gets other logprobs in a batch with longer ones (a sampler's and a trainer's batches differ)."""
    config = _text_config(model)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return None
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "dynamic":
        return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    if kind == "longrope":
        return int(rope.get("original_max_position_embeddings")
                   or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    return None


def layer_attention_mask(model: torch.nn.Module, attention_mask: Tensor | None,
                         position_ids: Tensor | None) -> Tensor | dict[str, Tensor] | None:
    """What `model` (a causal LM, a peft wrapper, a reward model's trunk) should get as `attention_mask`.

    A 2-D mask or None is returned as it is (transformers builds the layers' masks). A 4-D mask of a
    model without a sliding window is returned as it is; with one, the mask with the window cut in
    (`windowed`), or for models with per-layer types a dict {layer type: mask}. A model with layer types
    other than full and sliding attention (chunked, linear...), or one whose forward takes no position_ids
    (`takes_position_ids`), cannot be given an exact 4-D mask: a ConfigError.
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return attention_mask
    obstacle = packing_obstacle(model)
    if obstacle is not None:
        raise ConfigError(f"{obstacle}: use padded batches (data.batch_mode=padded, update.padding_free=false)")
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    window = sliding_window(config)
    if window is None:
        return attention_mask
    if position_ids is None:
        raise ValueError("a sliding-window mask for a 4-D attention mask needs the batch's position_ids")
    cut = windowed(attention_mask, position_ids, window)
    return cut if layer_types is None else {"full_attention": attention_mask, "sliding_attention": cut}


def attention_inputs(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """The input_ids, attention_mask and position_ids of `batch` (those it has), as `model` should get
    them (`layer_attention_mask`)."""
    inputs: dict[str, Any] = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "attention_mask" in inputs:
        inputs["attention_mask"] = layer_attention_mask(model, inputs["attention_mask"], inputs.get("position_ids"))
    return inputs
