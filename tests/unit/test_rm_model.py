"""The reward model: built from a causal LM's trunk, scored at the last real token on either padding
side, head-only training, MLP heads and LoRA survive saving and loading."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification

from posttrain.data.collate import collate_packed, collate_padded
from posttrain.models import save_pretrained
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.reward import (
    build_reward_model,
    freeze_backbone,
    last_token_index,
    load_reward_model,
    sample_end_index,
    scores_at,
    sequence_scores,
)


@pytest.fixture()
def lm_dir(tiny_model, tokenizer, tmp_path):
    return save_pretrained(tiny_model, tokenizer, tmp_path / "lm")


@pytest.fixture()
def samples(tokenizer):
    texts = ["What is 2+3? 5", "What is 12*7? 84 and more words here", "Hi"]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return [{"input_ids": i, "response_mask": [1] * len(i)} for i in ids]


def test_the_trunk_comes_from_the_causal_lm(tiny_model, lm_dir, tokenizer):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)
    lm_state = tiny_model.state_dict()
    for name, value in model.model.state_dict().items():
        assert_close(value, lm_state[f"model.{name}"], rtol=0, atol=0)
    assert model.score.weight.shape == (1, tiny_model.config.hidden_size)


def test_last_token_index_on_both_sides():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_scores_are_read_at_the_last_real_token_whatever_the_padding_side(lm_dir, tokenizer, samples):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    pad = tokenizer.pad_token_id
    right = sequence_scores(model, collate_padded(samples, pad, side="right"))
    left = sequence_scores(model, collate_padded(samples, pad, side="left"))
    alone = torch.cat([sequence_scores(model, collate_padded([s], pad)) for s in samples])
    assert_close(right, alone)
    assert_close(left, alone)
    # transformers' own forward agrees when the pad token is distinct from every real token
    hf = model(**{k: v for k, v in collate_padded(samples, pad).items() if k in ("input_ids", "attention_mask")})
    assert_close(hf.logits.squeeze(-1), alone)
    # and the score is the head applied at that position, nothing else
    batch = collate_padded(samples, pad)
    ends = last_token_index(batch["attention_mask"])
    assert_close(scores_at(model, batch, torch.stack([ends, ends - 1], 1))[:, 0], right)


def test_padding_free_batches_score_like_padded_ones(lm_dir, tokenizer, samples):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    packed = collate_packed([samples], tokenizer.pad_token_id)
    ends = torch.tensor([len(s["input_ids"]) for s in samples]).cumsum(0) - 1
    assert sample_end_index(packed["sample_ids"]).tolist() == ends.tolist()
    padded = collate_padded(samples, tokenizer.pad_token_id)
    assert_close(sequence_scores(model, packed), sequence_scores(model, padded))


def test_scores_of_sequences_packed_into_several_rows_come_back_in_sample_order(lm_dir, tokenizer, samples):
    """Capped padding-free rows: the odd samples fill row 0, the even ones row 1; scores stay in sample order."""
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    rows = [list(range(1, len(samples), 2)), list(range(0, len(samples), 2))]
    packed = collate_packed([[samples[i] for i in row] for row in rows], tokenizer.pad_token_id, indices=rows)
    width = packed["input_ids"].shape[1]
    expected = {}  # sample -> flat index of its last token, counted by hand
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            start += len(samples[i]["input_ids"])
            expected[i] = r * width + start - 1
    assert sample_end_index(packed["sample_ids"]).tolist() == [expected[i] for i in range(len(samples))]
    padded = collate_padded(samples, tokenizer.pad_token_id)
    assert_close(sequence_scores(model, packed), sequence_scores(model, padded))


def test_frozen_backbone_trains_the_head_only(lm_dir, tokenizer, samples):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)
    freeze_backbone(model)
    trunk = {k: v.clone() for k, v in model.model.state_dict().items()}
    head = model.score.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sequence_scores(model, collate_padded(samples, tokenizer.pad_token_id)).sum().backward()
    optimizer.step()
    for name, value in model.model.state_dict().items():
        assert_close(value, trunk[name], rtol=0, atol=0)
    assert not torch.equal(model.score.weight, head)


def test_mlp_head_saves_and_loads(lm_dir, tokenizer, samples, tmp_path):
    model = build_reward_model(lm_dir, head="mlp", head_width=32, pad_token_id=tokenizer.pad_token_id).eval()
    assert model.score[0].weight.shape == (32, model.config.hidden_size)
    batch = collate_padded(samples, tokenizer.pad_token_id)
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")
    assert_close(sequence_scores(load_reward_model(saved), batch), sequence_scores(model, batch))


def test_linear_head_loads_with_plain_transformers(lm_dir, tokenizer, samples, tmp_path):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(saved, local_files_only=True).eval()
    batch = collate_padded(samples, tokenizer.pad_token_id)
    assert_close(sequence_scores(plain, batch), sequence_scores(model, batch))


def test_lora_reward_model_trains_adapters_and_head_and_merges(lm_dir, tokenizer, samples, tmp_path):
    cfg = AdapterConfig(method="lora", r=4)
    model = apply_adapter(build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id), cfg, task_type="SEQ_CLS")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    batch = collate_padded(samples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sequence_scores(model, batch).sum().backward()
    optimizer.step()
    model.eval()
    saved = save_trained(model, tokenizer, tmp_path / "rm", cfg)
    merged = AutoModelForSequenceClassification.from_pretrained(saved, local_files_only=True).eval()
    assert_close(sequence_scores(merged, batch), sequence_scores(model, batch), rtol=1e-5, atol=1e-5)
