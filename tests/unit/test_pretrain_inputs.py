"""Pretraining's corpus and the models it continues: no held-out problem in the text, held-out text that is not
training text, and one-line errors for a model or setting pretraining cannot use."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from posttrain.config import ModelConfig
from posttrain.data.arith import Problem, is_heldout
from posttrain.data.corpus import plain_text, synthetic_documents
from posttrain.errors import ConfigError
from posttrain.models import build_model
from posttrain.recipes.pretrain import CorpusConfig, _check_model, document_texts, pack_texts

SOLVED = re.compile(r"(?<!\d)(-?\d+) ?([+\-*]) ?(-?\d+) ?=")  # "7+8=15", "-2 + 4 = 2"


def test_the_corpus_solves_no_held_out_problem():
    """Its chains of steps ("Start with 7. 7+8=15 15+8=23") wrote held-out problems solved (174 distinct ones in the
    default corpus): the held-out arith accuracy of every later stage measured problems the model had read."""
    solved = [Problem(int(a), op, int(b)) for document in itertools.islice(synthetic_documents(0), 20_000)
              for a, op, b in SOLVED.findall(plain_text(document))]
    assert len(solved) > 4_000
    assert [p.expression for p in solved if is_heldout(p)] == []


def test_the_corpus_works_no_held_out_multistep_chain_and_states_no_held_out_problem_as_a_fact():
    """Its chains worked held-out multistep problems ("Start with 15. 15*8=120 120-2=118": 18 of 1000 held-out
    chains, 7% of the two-step ones), and its number facts stated held-out arith problems ("The number after 41 is
    42" is 41+1, "41 doubled is 82" 41+41, 2*41 and 41*2)."""
    from posttrain.data.tasks import get_task, is_heldout_key

    chains, facts = set(), set()
    for document in itertools.islice(synthetic_documents(0), 20_000):
        text = plain_text(document)
        start = re.match(r"Start with (\d+)\.", text)
        if start:
            key = start.group(1)
            for op, b in re.findall(r"^-?\d+([+\-*])(\d+)=", text, re.MULTILINE):
                key += op + b
                chains.add(key)
        facts |= {Problem(int(n), "+", 1) for n in re.findall(r"The number after (\d+) is", text)}
        facts |= {p for n in re.findall(r"(\d+) doubled is", text)
                  for p in (Problem(int(n), "+", int(n)), Problem(2, "*", int(n)), Problem(int(n), "*", 2))}
    assert len(chains) > 1000 and len(facts) > 100
    heldout = {e.key for e in get_task("multistep").examples("heldout", 1000, 1234)}
    assert [key for key in chains if key in heldout or (key.count("+") + key.count("-") + key.count("*") >= 2
                                                        and is_heldout_key(key))] == []
    assert [p.expression for p in facts if is_heldout(p)] == []


def test_held_out_documents_are_not_training_documents(tokenizer):
    train = document_texts(tokenizer, synthetic_documents(0), 2000)
    heldout = document_texts(tokenizer, synthetic_documents(1), 200, leave_out=set(train))
    assert len(heldout) == 200 and not set(heldout) & set(train)
    assert len(set(document_texts(tokenizer, synthetic_documents(1), 200)) & set(train)) > 0  # there were some


def test_a_tokenizer_without_bos_or_chat_template_writes_plain_documents(tokenizer):
    """A base model's tokenizer (Qwen's has no BOS; GPT-2's no chat template) crashed continued pretraining."""
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    assert bare.bos_token is None and bare.chat_template is None
    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert document_texts(bare, iter(["7 is odd.", dialogue]), 2) == [f"7 is odd.{bare.eos_token}",
                                                                      f"Hi\nHello{bare.eos_token}"]
    with pytest.raises(ConfigError, match="model.path: the tokenizer has no end-of-text token"):
        _check_model(tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer), None, CorpusConfig())


def test_a_block_longer_than_a_learned_position_table_is_refused(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="corpus.seq_len: 128 tokens per block, but the model has positions for 64"):
        _check_model(tokenizer, gpt2, CorpusConfig(seq_len=128))
    _check_model(tokenizer, gpt2, CorpusConfig(seq_len=64))


def test_too_few_documents_for_a_block_names_the_setting(tokenizer):
    with pytest.raises(ConfigError, match="corpus.heldout_documents: 2 documents give .* fewer than one block"):
        pack_texts(tokenizer, ["a", "b"], 2048, "corpus.heldout_documents")
    blocks = pack_texts(tokenizer, document_texts(tokenizer, synthetic_documents(0), 50), 16, "x")
    assert blocks.dtype == torch.long and blocks.shape[1] == 16


@pytest.mark.parametrize("hidden, heads, message", [(64, 3, "64 is not divisible by model.num_heads=3"),
                                                    (30, 10, "30 / 10 heads is 3 dimensions per head"),
                                                    (36, 4, "36 / 4 heads is 9 dimensions per head")])
def test_a_custom_shape_the_model_cannot_take_is_a_config_error(tokenizer, hidden, heads, message):
    cfg = ModelConfig(size="custom", hidden_size=hidden, num_heads=heads, num_layers=1, intermediate_size=16)
    with pytest.raises(ConfigError, match=f"model.hidden_size: {message}"):
        build_model(cfg, tokenizer)
