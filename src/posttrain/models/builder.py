"""Build a fresh Llama-style causal LM for the offline default model (sizes from BENCHMARK.md)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError
from posttrain.models.device import default_device
from posttrain.models.kernels import use_fast_kernels

# (hidden, layers, heads, ffn): tiny ~1.31M and small ~26.75M parameters with a 1024-token vocab.
SIZES = {
    "tiny": (128, 4, 4, 512),
    "small": (512, 8, 8, 1408),
}


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    hidden, layers, heads, ffn = SIZES.get(cfg.size) or (
        cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size)
    if hidden % heads:
        raise ConfigError(f"{hidden} is not divisible by model.num_heads={heads}", field="model.hidden_size")
    if (hidden // heads) % 2:  # rotary embeddings turn pairs of a head's dimensions
        raise ConfigError(f"{hidden} / {heads} heads is {hidden // heads} dimensions per head; rotary position "
                          "embeddings need an even number", field="model.hidden_size")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama model sized by `cfg`, its vocab matching `tokenizer`, on the process's
    device (initialised on the CPU: the same weights for a seed on any device)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    use_fast_kernels(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    return model.to(default_device())


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
