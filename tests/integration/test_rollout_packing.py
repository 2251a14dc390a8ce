"""Padding-free recompute of a rollout's logprobs: the packed forward gives each completion token the
logprob and entropy of a forward over that sample alone, as the padded forward does, and projects only
the hidden states that predict completion tokens onto the vocabulary."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, GPT2Config

from posttrain.rollout import Rollout
from posttrain.rollout.recompute import pack_rollout, packed_logprobs_and_entropy, policy_logprobs_and_entropy

PROMPT_LENGTHS = [3, 11, 6, 1, 8]
# Completion lengths of a rollout with at most 7 new tokens: cut at 7 ("length"), ended by EOS, or a stop token.
COMPLETIONS = [(7, "length"), (2, "eos"), (5, "eos"), (1, "eos"), (4, "stop")]


def ragged_rollout(vocab: int, eos: int, temperature: float = 0.8) -> Rollout:
    """Left-padded prompts and right-padded completions of different lengths, random (non-EOS) tokens, and
    garbage ids in the padding, which must not matter."""
    generator = torch.Generator().manual_seed(0)
    rows, width = len(PROMPT_LENGTHS), max(n for n, _ in COMPLETIONS)
    prompt_ids = torch.randint(0, vocab, (rows, max(PROMPT_LENGTHS)), generator=generator)
    completion_ids = torch.randint(0, vocab, (rows, width), generator=generator)
    completion_ids[completion_ids == eos] = eos - 1
    prompt_mask = torch.zeros_like(prompt_ids)
    response_mask = torch.zeros_like(completion_ids)
    for i, (prompt, (completion, reason)) in enumerate(zip(PROMPT_LENGTHS, COMPLETIONS, strict=True)):
        prompt_mask[i, prompt_ids.shape[1] - prompt:] = 1
        response_mask[i, :completion] = 1
        if reason == "eos":
            completion_ids[i, completion - 1] = eos
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   response_mask=response_mask, logprobs=torch.zeros(completion_ids.shape),
                   finish_reasons=[reason for _, reason in COMPLETIONS], texts=[""] * rows,
                   prompt_index=torch.arange(rows), temperature=temperature)


def one_sample_at_a_time(model, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious reference: every sample's real tokens alone in a forward of their own, no padding, no mask."""
    logprobs = torch.zeros(rollout.completion_ids.shape, dtype=torch.float64)
    entropy = torch.zeros_like(logprobs)
    for i in range(len(rollout.finish_reasons)):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        completion = rollout.completion_ids[i][rollout.response_mask[i].bool()]
        tokens = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0].double() / rollout.temperature
        predicting = logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]
        log_p = predicting.log_softmax(-1)
        logprobs[i, :len(completion)] = log_p.gather(-1, completion[:, None]).squeeze(-1)
        entropy[i, :len(completion)] = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy


@pytest.mark.parametrize("capacity", [None, 1, 20], ids=["one-row", "one-sample-per-row", "rows-of-20"])
def test_packed_logprobs_and_entropy_equal_those_of_each_sample_alone_and_the_padded_ones(tiny_model, tokenizer,
                                                                                          capacity):
    rollout = ragged_rollout(len(tokenizer), tokenizer.eos_token_id)
    expected_logprobs, expected_entropy = one_sample_at_a_time(tiny_model, rollout)
    logprobs, entropy = packed_logprobs_and_entropy(tiny_model, rollout, capacity=capacity)
    padded_logprobs, padded_entropy = policy_logprobs_and_entropy(tiny_model, rollout)
    for got in (logprobs, padded_logprobs):
        assert_close(got.double(), expected_logprobs, rtol=0, atol=1e-5)
    for got in (entropy, padded_entropy):
        assert_close(got.double(), expected_entropy, rtol=0, atol=1e-5)
    assert_close(logprobs, padded_logprobs, rtol=0, atol=1e-5)
    assert (logprobs[rollout.response_mask == 0] == 0).all() and (entropy[rollout.response_mask == 0] == 0).all()
    assert logprobs.requires_grad and not entropy.requires_grad
    # Each sample's temperature-scaled distribution: another temperature is far off.
    hotter, _ = packed_logprobs_and_entropy(tiny_model, rollout, temperature=1.5, capacity=capacity)
    assert (hotter - logprobs).abs().max() > 1e-2


def test_rows_are_packed_without_padding_and_only_completion_positions_reach_the_output_head(tiny_model, tokenizer):
    rollout = ragged_rollout(len(tokenizer), tokenizer.eos_token_id)
    lengths = [p + c for p, (c, _) in zip(PROMPT_LENGTHS, COMPLETIONS, strict=True)]  # 10, 13, 11, 2, 12
    packed = pack_rollout(rollout, capacity=24)
    # Best-fit decreasing into rows of 24: {13, 11}, {12, 10, 2}: 24 columns each, no padding.
    assert packed.input_ids.shape == (2, 24) and sum(lengths) == 48
    assert packed.position_ids[0].tolist() == list(range(13)) + list(range(11))
    # The hidden state before completion token j of sample 1 (13 tokens: 11 prompt, 2 completion) predicts it.
    sample_1 = packed.target_rows == 1
    assert packed.source_cols[sample_1].tolist() == [10, 11] and packed.target_cols[sample_1].tolist() == [0, 1]
    shapes = []
    handle = tiny_model.lm_head.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    try:
        packed_logprobs_and_entropy(tiny_model, rollout, capacity=24)
    finally:
        handle.remove()
    assert shapes == [(1, sum(c for c, _ in COMPLETIONS), tiny_model.config.hidden_size)]


def test_a_rollout_row_without_a_prompt_token_is_refused(tiny_model, tokenizer):
    rollout = ragged_rollout(len(tokenizer), tokenizer.eos_token_id)
    rollout.prompt_mask[0] = 0
    with pytest.raises(ValueError, match="real prompt token"):
        packed_logprobs_and_entropy(tiny_model, rollout)


def test_a_row_wider_than_a_learned_position_table_packs_samples_that_fit_it(tokenizer):
    """GPT-2 has a table of n_positions positions. Every sample here fits 16 (at most 10 tokens), but a prompt shared
    by its 4 samples makes a unit of 3 + 4 x 7 = 31 tokens, so the other row (a 3-token sample) is padded to 31.
    Padding positions counted on from 0 indexed past the table (IndexError); the packed logprobs are each sample's
    alone."""
    torch.manual_seed(0)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=eos)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, vocab, (1, 3), generator=generator).repeat(5, 1)
    prompt_ids[4] = torch.randint(0, vocab, (3,), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[4, 0] = 0  # a 2-token prompt
    completion_ids = torch.randint(0, vocab, (5, 7), generator=generator)
    completion_ids[completion_ids == eos] = eos - 1
    response_mask = torch.ones_like(completion_ids)
    response_mask[4, 1:] = 0
    rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      response_mask=response_mask, logprobs=torch.zeros(completion_ids.shape),
                      finish_reasons=["length"] * 4 + ["stop"], texts=[""] * 5,
                      prompt_index=torch.tensor([0, 0, 0, 0, 1]), temperature=1.0)
    packed = pack_rollout(rollout, capacity=31, share_prompts=True)
    assert packed.input_ids.shape == (2, 31)  # the second row: 3 tokens, then 28 of padding
    expected, _ = one_sample_at_a_time(model, rollout)
    logprobs, _ = packed_logprobs_and_entropy(model, rollout, capacity=31, share_prompts=True)
    assert_close(logprobs.double(), expected, rtol=0, atol=1e-5)
