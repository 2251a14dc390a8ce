"""Models: the offline tiny model and tokenizer builder, and HF-format load/save."""

from posttrain.models.builder import SIZES, build_model, count_parameters, llama_config
from posttrain.models.io import (
    load_causal_lm,
    load_tokenizer,
    load_tokenizer_and_model,
    resolve_dtype,
    save_pretrained,
)
from posttrain.models.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, train_tokenizer

__all__ = ["BOS", "CHAT_TEMPLATE", "EOS", "PAD", "SIZES", "build_model", "count_parameters",
           "llama_config", "load_causal_lm", "load_tokenizer", "load_tokenizer_and_model", "resolve_dtype",
           "save_pretrained", "train_tokenizer"]
