"""Parameter-efficient fine-tuning through peft: LoRA and prefix-tuning, merged or not on save.

LoRA's targets default to peft's `all-linear`: every linear (and GPT-2-style Conv1D) layer but the output
head, whatever the architecture calls them (Llama's q_proj..down_proj, GPT-2's c_attn/c_proj/c_fc, Phi's
q/k/v_proj, dense, fc1, fc2). Named targets are checked against the model before peft sees them: a name
that matches no layer is an error naming the layers there are, not a peft traceback, and not a silently
smaller adapter (Llama's names on a Phi model would adapt q/k/v alone).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from posttrain.config import param
from posttrain.errors import ConfigError
from posttrain.models.dropout import dropout_disabled
from posttrain.models.io import adapter_base, save_pretrained

ALL_LINEAR = "all-linear"  # peft's keyword for every linear/Conv1D layer but the output head
# The layer kinds peft's LoRA adapts (a name matching only a block, e.g. "mlp", is not a target).
LORA_LAYERS = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: str = param("none", "Full fine-tuning (none), LoRA, or prefix-tuning.", choices=("none", "lora", "prefix"))
    r: int = param(16, "LoRA rank.", ge=1)
    alpha: float = param(32.0, "LoRA alpha (updates are scaled by alpha / r).", gt=0)
    dropout: float = param(0.0, "LoRA dropout; none where the stage turns the model's dropout off "
                                "(model.disable_dropout: by default every stage but SFT and pretraining).", ge=0, lt=1)
    target_modules: list[str] = param([ALL_LINEAR], "Layers LoRA adapts: all-linear (every linear/Conv1D layer "
                                                    "but the output head, any architecture), layer names (q_proj, "
                                                    "c_attn...), or [] for peft's per-architecture default.")
    num_virtual_tokens: int = param(16, "Prefix length for prefix-tuning.", ge=1)
    merge_on_save: bool = param(True, "Save LoRA merged into the base weights (a plain HF model); off: save "
                                      "the adapter alone.")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct names (last dotted part) of the model's linear and Conv1D layers, output head excluded."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head]
    return list(dict.fromkeys(names))


def peft_refused_layers(model: torch.nn.Module) -> set[str]:
    """The linear layers' names peft's LoRA refuses for this architecture (the out_proj of Falcon-H1's, Mamba's
    and Nemotron-H's mixers), asked of peft's own check; none when this peft has no such check."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:
        return set()
    refused = set()
    for name in linear_layer_names(model):
        try:
            check(LoraConfig(target_modules=[name]), model, name)
        except ValueError:
            refused.add(name)
    return refused


def lora_targets(model: torch.nn.Module, names: Sequence[str]) -> str | list[str]:
    """`LoraConfig.target_modules` for the configured `names`: peft's `all-linear`, peft's default for the
    model's architecture ([]), or the names, each checked to match a layer LoRA can adapt (peft's rule: the
    module's dotted name is the target or ends with "." + target)."""
    field = "adapter.target_modules"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = f"its linear layers: {', '.join(linear_layer_names(model))} (or all-linear for all of them)"
    names = list(names)
    if names == [ALL_LINEAR]:
        refused = peft_refused_layers(model)
        if not refused:
            return ALL_LINEAR
        # peft refuses some of the linear layers of this architecture (Mamba mixers' out_proj): every other one.
        from peft.utils.constants import SEQ_CLS_HEAD_NAMES  # a reward model's head trains in full, as with all-linear

        return [name for name in linear_layer_names(model) if name not in refused and name not in SEQ_CLS_HEAD_NAMES]
    if ALL_LINEAR in names:
        raise ConfigError(f"{ALL_LINEAR} stands alone (it means every linear layer), got {names}", field=field)
    keys = [key for key, module in model.named_modules() if isinstance(module, LORA_LAYERS)]
    if not names:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if default is None:
            raise ConfigError(f"peft has no default LoRA targets for {model_type} models: name them; {layers}",
                              field=field)
        if isinstance(default, str):  # a regular expression over the whole dotted name
            if not any(re.fullmatch(default, key) for key in keys):
                raise ConfigError(f"peft's default {default!r} matches no layer of this model; {layers}", field=field)
            return default
        names = list(default)
    missing = [name for name in names if not any(key == name or key.endswith(f".{name}") for key in keys)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'matches' if len(missing) == 1 else 'match'} no layer of this "
                          f"{model_type} model; {layers}", field=field)
    return names


def refuse_unmerged_adapter(model: torch.nn.Module) -> None:
    """A model loaded from a prefix-tuning adapter directory (`io.load_causal_lm` merges a LoRA one, not this) is
    evaluated and sampled, never trained on or built from: a one-line error naming model.path."""
    if hasattr(model, "peft_config"):
        raise ConfigError("is a prefix-tuning adapter, which cannot merge into its base model to train on: `posttrain "
                          "eval` scores it; to train further, start from its base model with adapter.method=prefix",
                          field="model.path")


def check_adapter(model: torch.nn.Module, cfg: AdapterConfig) -> None:
    """Refuse LoRA targets the model does not have, or that a save would merge wrongly, before a run writes
    anything or spends minutes evaluating (`apply_adapter` comes later in a recipe, after the run directory and the
    first evaluation)."""
    refuse_unmerged_adapter(model)
    if cfg.method == "lora":
        refuse_tied_targets(model, lora_targets(model, cfg.target_modules))


def refuse_tied_targets(model: torch.nn.Module, targets: str | list[str]) -> None:
    """LoRA on the output head or the input embeddings of a model whose two share one weight (tied embeddings)
    cannot be merged: the head's update would land in the embeddings too (peft only warns), so the saved model would
    not be the trained one."""
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inputs, outputs = (get_input() if get_input else None), (get_output() if get_output else None)
    if inputs is None or outputs is None or inputs.weight is not outputs.weight or not isinstance(targets, list):
        return
    for key, module in model.named_modules():
        if module in (inputs, outputs) and any(key == name or key.endswith(f".{name}") for name in targets):
            raise ConfigError(f"{key} shares its weight with the {'input' if module is outputs else 'output'} "
                              "embeddings (tied embeddings): a LoRA on it would change both when merged; leave it "
                              "out of the targets", field="adapter.target_modules")


def check_adapter_start(path: str | None, cfg: AdapterConfig | None) -> None:
    """A model directory that is itself an adapter (LoRA saved unmerged) is merged over its base to train on; an
    adapter trained from it must then be saved merged too: saved as an adapter it would record the original base,
    and the first adapter's training would be lost when it loads."""
    if path is None or cfg is None or cfg.method == "none" or (cfg.method == "lora" and cfg.merge_on_save):
        return
    base = adapter_base(path)
    if base is not None:
        raise ConfigError(f"model.path is an adapter over {base}: an adapter trained on it would load "
                          "over that base without the first adapter; save merged (adapter.method=lora, "
                          "adapter.merge_on_save=true)", field="adapter.merge_on_save")


def apply_adapter(model: PreTrainedModel, cfg: AdapterConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with a peft adapter (only its parameters train); unchanged for method=none.

    `task_type` is peft's: CAUSAL_LM for policies, SEQ_CLS for reward models (whose `score` head
    then trains in full beside the adapter).
    """
    if cfg.method == "none":
        return model
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    task = TaskType[task_type]
    if cfg.method == "lora":
        # No LoRA dropout on a model whose stage turned dropout off (model.disable_dropout): it compares logprobs
        # of train-mode forwards with the sampler's or pi_old's, which a dropout mask would make differ.
        dropout = 0.0 if dropout_disabled(model) else cfg.dropout
        check_rank(model, cfg.r)
        peft_config = LoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=dropout,
                                 target_modules=lora_targets(model, cfg.target_modules))
    else:
        peft_config = PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    adapted = get_peft_model(model, peft_config)
    for config in adapted.peft_config.values():
        # The base as a path from anywhere: peft records it as the model was named (`runs/sft/final`, relative to
        # where the run started), and an adapter directory read from elsewhere then found no base (peft took the
        # name for a Hub model to download).
        base = config.base_model_name_or_path
        if base and not Path(base).is_absolute() and Path(base).is_dir():
            config.base_model_name_or_path = str(Path(base).resolve())
    return adapted


def check_rank(model: torch.nn.Module, r: int) -> None:
    """Refuse a LoRA rank above the rank any of the model's layers can have (min of its weight's two sizes): B A of
    rank r > min(in, out) adds nothing a smaller one could not, and costs r x (in + out) per layer (r=100000 on a
    128-wide model: 2 steps in 135 s)."""
    sizes = [min(m.weight.shape) for m in model.modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and getattr(m, "weight", None) is not None
             and m.weight.dim() == 2]
    if sizes and r > max(sizes):
        raise ConfigError(f"adapter.r={r} is above the rank of every layer of this model (at most {max(sizes)}, the "
                          f"smaller size of its largest layer): a larger rank adds nothing; use adapter.r <= "
                          f"{max(sizes)}", field="adapter.r")


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path,
                 cfg: AdapterConfig, answer_ends: Collection[int] = ()) -> Path:
    """Save the trained model as a Hugging Face directory.

    LoRA with merge_on_save folds the adapter into the base weights (W + BA * alpha / r), so the
    result loads with AutoModelForCausalLM and costs nothing extra at inference; otherwise the peft
    adapter is saved (it loads with peft's AutoPeftModelForCausalLM over the base model). Merging
    works on a copy: the live model keeps its adapter. 16-bit weights are merged and saved in float32: a LoRA
    update is mostly below bfloat16's resolution of the weight it adds to (rounded back to bfloat16 about half of
    it was lost).
    """
    if cfg.method == "lora" and cfg.merge_on_save:
        import copy

        merged = copy.deepcopy(model)
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in merged.parameters()):
            merged = merged.float()
        return save_pretrained(merged.merge_and_unload(), tokenizer, directory, answer_ends)
    return save_pretrained(model, tokenizer, directory, answer_ends)
