"""The offline model builder: the sizes of BENCHMARK.md and a working forward pass."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError
from posttrain.models import build_model, count_parameters, llama_config, load_causal_lm, save_pretrained


class _Vocab:
    """Only len() and the special ids of a tokenizer are read when sizing a model."""

    def __len__(self) -> int:
        return 1024

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def _llama_parameters(vocab: int, hidden: int, layers: int, ffn: int) -> int:
    """Counted by hand: untied embedding and head, q/k/v/o, gate/up/down, two norms per layer, final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize("size, shape, approx", [("tiny", (128, 4, 512), 1.31e6), ("small", (512, 8, 1408), 26.75e6)])
def test_sizes_match_the_benchmark_models(size, shape, approx):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        built = LlamaForCausalLM(llama_config(ModelConfig(size=size), _Vocab()))
    hidden, layers, ffn = shape
    assert count_parameters(built) == _llama_parameters(1024, hidden, layers, ffn)
    assert count_parameters(built) == pytest.approx(approx, rel=5e-3)  # the figures BENCHMARK.md quotes


def test_custom_size_and_bad_head_count():
    cfg = ModelConfig(size="custom", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    config = llama_config(cfg, _Vocab())
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    with pytest.raises(ConfigError, match="model.hidden_size: 64 is not divisible"):
        llama_config(ModelConfig(size="custom", hidden_size=64, num_heads=5), _Vocab())


def test_built_model_uses_the_tokenizer_ids(tokenizer, tiny_model):
    assert tiny_model.config.vocab_size == len(tokenizer)
    assert tiny_model.config.pad_token_id == tokenizer.pad_token_id != tiny_model.config.eos_token_id
    assert not tiny_model.config.tie_word_embeddings
    ids = torch.tensor([tokenizer("What is 1+1?")["input_ids"]])
    logits = tiny_model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and logits.dtype == torch.float32


def test_build_is_deterministic_under_a_seed(tokenizer):
    a = build_model(ModelConfig(), tokenizer, seed=3)
    b = build_model(ModelConfig(), tokenizer, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_a_loaded_model_keeps_the_forwards_set_on_its_layers_through_train_and_eval(tokenizer, tiny_model, tmp_path):
    """No hub kernels (transformers >= 5.25 turns them on by default when `kernels` is installed): nothing is
    fetched, and train()/eval() does not re-kernelize the layers, which would reset a forward set on one of them
    (the float64 norms of the layout tests, an adapter's patch)."""
    model = load_causal_lm(save_pretrained(tiny_model, tokenizer, tmp_path / "lm"))
    assert not getattr(model, "use_kernels", False)
    norm = model.model.norm
    norm.forward = lambda hidden: hidden * 0
    for mode in (True, False, True):
        model.train(mode)
        assert norm(torch.ones(1, 3)).abs().sum() == 0
