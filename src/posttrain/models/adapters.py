"""Parameter-efficient fine-tuning through peft: LoRA and prefix-tuning, merged or not on save."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.config import param
from posttrain.models.io import save_pretrained

LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: str = param("none", "Full fine-tuning (none), LoRA, or prefix-tuning.", choices=("none", "lora", "prefix"))
    r: int = param(16, "LoRA rank.", ge=1)
    alpha: float = param(32.0, "LoRA alpha (updates are scaled by alpha / r).", gt=0)
    dropout: float = param(0.0, "LoRA dropout.", ge=0, lt=1)
    target_modules: list[str] = param(LLAMA_LINEAR_MODULES, "Module names LoRA adapts (all linear layers of a "
                                                            "Llama block by default).")
    num_virtual_tokens: int = param(16, "Prefix length for prefix-tuning.", ge=1)
    merge_on_save: bool = param(True, "Save LoRA merged into the base weights (a plain HF model); off: save "
                                      "the adapter alone.")


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
        peft_config = LoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha,
                                 lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    else:
        peft_config = PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    return get_peft_model(model, peft_config)


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path,
                 cfg: AdapterConfig) -> Path:
    """Save the trained model as a Hugging Face directory.

    LoRA with merge_on_save folds the adapter into the base weights (W + BA * alpha / r), so the
    result loads with AutoModelForCausalLM and costs nothing extra at inference; otherwise the peft
    adapter is saved (it loads with peft's AutoPeftModelForCausalLM over the base model). Merging
    works on a copy: the live model keeps its adapter.
    """
    if cfg.method == "lora" and cfg.merge_on_save:
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        return save_pretrained(merged, tokenizer, directory)
    return save_pretrained(model, tokenizer, directory)
