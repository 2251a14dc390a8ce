"""Rollout pieces without a model: sampling params, truncation, the sampling step, positions, the factory."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.algos import token_logprobs
from posttrain.errors import ConfigError
from posttrain.rollout import SamplingParams, make_engine, position_ids_from_mask
from posttrain.rollout.local import LocalRolloutEngine, prompt_token_lists
from posttrain.rollout.sampling import draw, sample_next, truncate_logits

NEG_INF = float("-inf")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n must"), ({"stop": ("",)}, "stop strings"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_lists_and_greedy_temperature():
    params = SamplingParams(stop=["\n"], stop_token_ids=[7, 9], temperature=0)  # as read from YAML
    assert params.stop == ("\n",) and params.stop_token_ids == (7, 9)
    assert params.greedy and params.logprob_temperature == 1.0
    assert SamplingParams(temperature=0.7).logprob_temperature == 0.7


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 1.0, 5.0]])
    out = truncate_logits(logits, top_k=2)
    torch.testing.assert_close(out, torch.tensor([[NEG_INF, 3.0, 2.0, NEG_INF], [5.0, 5.0, NEG_INF, 5.0]]))
    torch.testing.assert_close(truncate_logits(logits, top_k=4), logits)  # k >= vocab: off


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # mass strictly before each token, by decreasing probability: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95
    kept = torch.isfinite(truncate_logits(logits, top_p=0.8))
    assert kept.tolist() == [[False, True, False, True]]
    kept = torch.isfinite(truncate_logits(logits, top_p=0.81))
    assert kept.tolist() == [[False, True, True, True]]
    kept = torch.isfinite(truncate_logits(logits, top_p=0.01))  # the most likely token always stays
    assert kept.tolist() == [[False, True, False, False]]


def test_sample_next_logprobs_are_the_trainers_full_distribution_logprobs():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0)) * 3
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=3, top_p=0.9)):
        tokens, logprobs = sample_next(logits, params, torch.Generator().manual_seed(1))
        # Not the truncated distribution's: top-k / top-p do not change the reported logprobs.
        expected = token_logprobs(logits.unsqueeze(1), tokens.unsqueeze(1), params.temperature).squeeze(1)
        torch.testing.assert_close(logprobs, expected)


def test_greedy_takes_the_argmax_with_temperature_one_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logprobs = sample_next(logits, SamplingParams(temperature=0))
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_sampling_stays_inside_top_k_and_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -1.0, -2.0]]).expand(4000, 4)
    tokens, _ = sample_next(logits, SamplingParams(top_k=2), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4)
    assert counts[2:].sum() == 0
    assert abs(counts[1].item() / 4000 - 0.75) < 0.03  # renormalised over the two kept tokens: 3 : 1


def test_sampling_is_reproducible_under_a_generator():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    a, _ = sample_next(logits, SamplingParams(), torch.Generator().manual_seed(5))
    b, _ = sample_next(logits, SamplingParams(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_positions_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_prompts_from_lists_or_a_padded_token_batch():
    batch = {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    assert prompt_token_lists(batch) == [[5, 6], [7]] == prompt_token_lists([(5, 6), [7]])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        prompt_token_lists([[1], []])
    with pytest.raises(ValueError, match="at least one prompt"):
        prompt_token_lists([])


def test_one_encoding_and_ragged_batches_are_prompts_as_their_rows_say(tokenizer):
    """tokenizer(text) is one prompt (it became one prompt per token); a batch without padding has ragged rows."""
    one = tokenizer("1 + 1 =")
    assert prompt_token_lists(one) == [one["input_ids"]]
    assert prompt_token_lists(tokenizer("1 + 1 =", return_tensors="pt")) == [one["input_ids"]]
    texts = ["1 + 1 =", "12 + 30 = 42"]
    ragged = tokenizer(texts)
    assert prompt_token_lists(ragged) == ragged["input_ids"] == [tokenizer(t)["input_ids"] for t in texts]
    assert prompt_token_lists({"input_ids": [[5, 6], [7]]}) == [[5, 6], [7]]
    with pytest.raises(ValueError, match="attention_mask does not match"):
        prompt_token_lists({"input_ids": [[5, 6], [7]], "attention_mask": [[1, 1], [1, 1]]})


def test_a_stop_string_or_token_given_alone_is_one_stop():
    """A str is a sequence too: stop="</answer>" became nine one-character stops (every completion ended at once)."""
    params = SamplingParams(stop="</answer>", stop_token_ids=7)
    assert params.stop == ("</answer>",) and params.stop_token_ids == (7,)
    with pytest.raises(ValueError, match="non-empty strings"):
        SamplingParams(stop=(3,))


def test_make_engine_refuses_unknown_names():
    # vLLM without the package or a GPU: tests/unit/test_rollout_vllm.py
    with pytest.raises(ConfigError, match="unknown rollout engine 'fast'.*local, vllm"):
        make_engine("fast", torch.nn.Linear(1, 1), None)


def test_length_groups_split_sorted_lengths_into_contiguous_runs():
    from posttrain.rollout.forward import length_groups

    assert length_groups([1, 2, 3, 5, 8, 13, 21, 34], 4) == [(0, 2, 2), (2, 4, 5), (4, 6, 13), (6, 8, 34)]
    assert length_groups([4, 9], 4) == [(0, 1, 4), (1, 2, 9)]  # never more groups than rows
    assert length_groups([7], 4) == [(0, 1, 7)]


@pytest.mark.parametrize(("kept", "new_count", "new_groups"), [
    ([1, 3, 6, 7], 2, [(0, 2, 4), (2, 4, 11)]),  # 1: width 3 -> 4 (wider); 3: 6 -> 4 (narrower); 6, 7: 11 -> 11
    ([0, 4, 7], 1, [(0, 3, 11)]),  # one new group from three old ones
    ([5, 7], 2, [(0, 1, 8), (1, 2, 11)]),  # the first two old groups left entirely
], ids=["wider-narrower-same", "three-into-one", "groups-left"])
def test_regroup_moves_each_kept_prompts_real_slots_into_its_new_groups_width(kept, new_count, new_groups):
    """The decoder's per-group caches after finished prompts leave: each kept prompt's real slots right-aligned in
    its new group's width and padding (zeros in a cache, -inf in its bias, made afresh for the new groups) in front,
    whether its new group is wider than its old one, narrower, or the same; against building every group from
    scratch, prompt by prompt."""
    from posttrain.rollout.forward import left_padding_bias, length_groups, regroup, regroup_plan

    lengths = [2, 3, 3, 4, 6, 8, 9, 11]
    real = [torch.randn(2, length, 4) for length in lengths]  # [kv, len, D] of each prompt

    def build(groups, prompts, pad, dim):
        """Left-padded group caches of `prompts`: keys [m, kv, P, D] (dim -2) or a bias [m, P] (dim -1)."""
        caches = []
        for a, b, longest in groups:
            cache = torch.full((b - a, 2, longest, 4) if dim == -2 else (b - a, longest), pad)
            for row, u in enumerate(prompts[a:b]):
                if dim == -2:
                    cache[row, :, longest - lengths[u]:] = real[u]
                else:
                    cache[row, longest - lengths[u]:] = 0.0
            caches.append(cache)
        return caches

    groups = length_groups(lengths, 3)
    assert groups == [(0, 3, 3), (3, 5, 6), (5, 8, 11)]
    assert length_groups([lengths[u] for u in kept], new_count) == new_groups
    moved = regroup(build(groups, list(range(8)), 0.0, -2), regroup_plan(groups, torch.tensor(kept), new_groups))
    for got, expected in zip(moved, build(new_groups, kept, 0.0, -2), strict=True):
        assert got.is_contiguous() and torch.equal(got, expected)
    kept_lengths = torch.tensor([lengths[u] for u in kept])
    biases = [left_padding_bias(kept_lengths[a:b], longest, torch.float32) for a, b, longest in new_groups]
    for got, expected in zip(biases, build(new_groups, kept, float("-inf"), -1), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_transformers_own_in_the_promoted_dtype(dtype):
    """The decoder's RoPE against transformers' `apply_rotary_pos_emb`, bitwise: under bf16 autocast the queries
    are bf16 and cos/sin fp32, and transformers' products give fp32 (the trainer's queries and keys)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from posttrain.rollout.forward import _rotate

    torch.manual_seed(0)
    x = torch.randn(7, 4, 16).to(dtype)  # [tokens, heads, head_dim]
    angles = torch.rand(7, 1, 16) * 6
    cos, sin = angles.cos(), angles.sin()
    expected, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None, :, 0],
                                       sin[None, :, 0])
    ours = _rotate(x, cos, sin)
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours, expected[0].transpose(0, 1))


def test_draws_follow_the_distribution_and_never_pick_a_token_of_probability_zero():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.6, 0.05, 0.0])
    n = 200_000
    tokens = draw(probs.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=7).double()
    assert counts[probs == 0].sum() == 0
    # each count within 5 standard deviations of its binomial mean (n p, sd sqrt(n p (1 - p)))
    expected = n * probs.double()
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs.double())).sqrt()).all()


def test_a_uniform_draw_at_the_top_of_the_range_takes_the_last_token_that_has_probability(monkeypatch):
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.1, 0.4]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.ones(*shape, dtype=kwargs.get("dtype")))
    assert draw(probs).tolist() == [1, 3]  # u * total == total: past every cumulative sum without the guard


def test_turn_end_ids_are_eos_and_the_templates_end_of_turn(tokenizer, chatml_tokenizer, base_chatml_tokenizer,
                                                            phi3_tokenizer):
    """What ends an answer in the training rows: EOS alone where the template ends a turn with it (the project's,
    ChatML's instruct tokenizer), also `<|im_end|>` for a base Qwen tokenizer (EOS `<|endoftext|>`) and `<|end|>` for
    Phi-3 (which writes `<|endoftext|>` after the last turn); EOS alone without a template."""
    from conftest import build_chatml_tokenizer

    from posttrain.data.tokenize import turn_end_ids

    def ids(tok, *tokens):
        return frozenset(tok.convert_tokens_to_ids(list(tokens)))

    assert turn_end_ids(tokenizer) == ids(tokenizer, "<|end|>")
    assert turn_end_ids(chatml_tokenizer) == ids(chatml_tokenizer, "<|im_end|>")
    assert turn_end_ids(base_chatml_tokenizer) == ids(base_chatml_tokenizer, "<|im_end|>", "<|endoftext|>")
    assert turn_end_ids(phi3_tokenizer) == ids(phi3_tokenizer, "<|end|>", "<|endoftext|>")
    # a tokenizer whose <think> is a special token, with a template that opens every answer with a thinking block:
    # the turn ends at <|im_end|>, not at the <think> the template writes before the answer
    thinking = build_chatml_tokenizer("<|endoftext|>", special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                      "<think>", "</think>"))
    thinking.chat_template = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                              "<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{%- endfor %}"
                              "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    assert turn_end_ids(thinking) == ids(thinking, "<|im_end|>", "<|endoftext|>")
    plain = copy.deepcopy(base_chatml_tokenizer)
    plain.chat_template = None
    assert turn_end_ids(plain) == ids(plain, "<|endoftext|>")


def test_sampling_stops_at_the_templates_end_of_turn_when_it_is_not_eos(base_chatml_tokenizer, base_chatml_model_dir):
    """A base Qwen tokenizer: SFT trains `<|im_end|>` at the end of each answer, so a model that learned it writes
    `<|im_end|>`; sampling once stopped at EOS (`<|endoftext|>`) alone and went on into made-up turns."""
    from transformers import AutoModelForCausalLM

    from posttrain.data.config import DataConfig
    from posttrain.data.schemas import message
    from posttrain.data.tokenize import Encoder

    tok = base_chatml_tokenizer
    model = AutoModelForCausalLM.from_pretrained(base_chatml_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    encoder = Encoder.from_config(tok, DataConfig())
    assert im_end in [t for t, m in zip(*encoder.encode([message("user", "hi"), message("assistant", "5")]),
                                        strict=True) if m]  # what SFT trains the model to write
    model.lm_head.register_forward_hook(lambda module, inputs, output: output.index_fill_(-1, torch.tensor([im_end]),
                                                                                           50.0))
    prompt = encoder.encode_prompt([message("user", "hi")])
    for forward in ("auto", "hf"):
        rollout = LocalRolloutEngine(model, tok, forward).generate([prompt], SamplingParams(max_new_tokens=6, n=2))
        assert rollout.completion_ids[:, 0].tolist() == [im_end, im_end]
        assert rollout.completion_lengths.tolist() == [1, 1] and rollout.finish_reasons == ["eos", "eos"]
