"""`pretrain --quick`: the output loads with plain transformers, generates, and has learned."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import ModelConfig
from posttrain.data.corpus import synthetic_documents
from posttrain.models import build_model
from posttrain.recipes.pretrain import CorpusConfig, document_texts, heldout_loss, pack_texts
from posttrain.train.metrics import read_metrics

# A seed the training stream never used: this text is new to the model.
UNSEEN_SEED = 987_654


def test_final_model_loads_with_plain_transformers_and_generates(pretrained_run):
    final = pretrained_run.final_dir
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_pretrained_loss_is_far_below_untrained(pretrained_run):
    final = pretrained_run.final_dir
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    trained = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    untrained = build_model(ModelConfig(size="tiny"), tokenizer, seed=1)
    corpus = CorpusConfig()
    texts = document_texts(tokenizer, synthetic_documents(UNSEEN_SEED, corpus.chat_share), 300)
    blocks = pack_texts(tokenizer, texts, corpus.seq_len, "corpus.heldout_documents")
    before, after = heldout_loss(untrained, blocks, 32), heldout_loss(trained, blocks, 32)
    # An untrained model sits near ln(vocab) ~ 6.3 nats; a quick pretraining run gets under 40% of that.
    assert before > 5.5
    assert after < 0.4 * before


def test_run_directory_is_complete(pretrained_run):
    run = pretrained_run.run_dir
    for name in ("config.yaml", "metrics.jsonl", "report.md", "plots/curves.png", "final/model.safetensors",
                 "final/tokenizer.json", "final/config.json"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run / "metrics.jsonl")
    assert metrics[-1]["step"] == pretrained_run.summary["steps"]
    assert all(m["tokens_per_s"] > 0 for m in metrics if "tokens_per_s" in m)
    torch.testing.assert_close(metrics[-1]["eval_loss"], pretrained_run.summary["final_eval_loss"])


def test_blocks_longer_than_the_built_model_s_positions_are_refused_before_the_tokenizer_is_trained(tmp_path):
    """Its config.json claimed 512 positions for a model trained on blocks of 1024."""
    import pytest

    from posttrain.config import load_config
    from posttrain.errors import ConfigError
    from posttrain.recipes import find_recipe
    from posttrain.recipes.pretrain import PretrainConfig, main

    cfg = load_config(PretrainConfig, find_recipe("pretrain").path, [f"run.out_dir={tmp_path}", "corpus.seq_len=1024"])
    with pytest.raises(ConfigError, match=r"corpus.seq_len=1024 is longer than model.max_position_embeddings=512") \
            as err:
        main(cfg)
    assert err.value.field == "corpus.seq_len" and not list(tmp_path.iterdir())
