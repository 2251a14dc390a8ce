"""Padding-free and packed forwards honour a model's sliding window: a windowed model (window 4, samples of
up to 20 tokens) gives the same per-token logprobs, rollout logprobs, values and reward scores packed as
padded, and as over each sample alone; the window changes those numbers (so the tests can fail)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Gemma2Config,
    MistralConfig,
    Qwen2Config,
)

from posttrain.data.collate import collate_packed, collate_padded
from posttrain.errors import ConfigError
from posttrain.models.attention import layer_attention_mask
from posttrain.models.likelihood import response_logprobs
from posttrain.models.reward import sequence_scores
from posttrain.models.value import ActorCritic
from posttrain.rollout import Rollout
from posttrain.rollout.recompute import pack_rollout, packed_logprobs_and_entropy, policy_logprobs_and_entropy

VOCAB, WINDOW = 97, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
# Mistral: every layer windowed; Qwen2: the layers from max_window_layers on; Gemma2: every other layer.
CONFIGS = {
    "mistral": lambda window: MistralConfig(sliding_window=window, **COMMON),
    "qwen2": lambda window: Qwen2Config(use_sliding_window=window is not None, sliding_window=window,
                                        max_window_layers=1, **COMMON),
    "gemma2": lambda window: Gemma2Config(
        sliding_window=window or 4096, **COMMON,
        layer_types=["sliding_attention", "full_attention"] if window else ["full_attention"] * 2),
}


def tiny_config(kind: str, window: int | None, num_labels: int = 2):
    config = CONFIGS[kind](window)
    config.num_labels = num_labels  # 1 for a reward model or critic
    return config


def tiny_lm(kind: str, window: int | None = WINDOW, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, window)).eval()


def samples(lengths=(20, 13, 7, 18)) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist(),
             "response_mask": [0] * 3 + [1] * (n - 3)} for n in lengths]


def alone(model, sample) -> torch.Tensor:
    """The obvious reference: one sample's trained tokens' logprobs from a forward over it alone, no mask."""
    ids = torch.tensor(sample["input_ids"])[None]
    with torch.no_grad():
        log_p = model(input_ids=ids, use_cache=False).logits[0, :-1].log_softmax(-1)
    picked = log_p.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return picked[torch.tensor(sample["response_mask"][1:]).bool()]


def trained(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logprobs[mask.bool()]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_packed_response_logprobs_of_a_windowed_model_equal_the_padded_and_each_sample_alone(kind):
    model, rows = tiny_lm(kind), samples()
    expected = torch.cat([alone(model, s) for s in rows])
    with torch.no_grad():
        padded = trained(*response_logprobs(model, collate_padded(rows, 0)))
        packed = trained(*response_logprobs(model, collate_packed([rows[:2], rows[2:]], 0)))
        packed_one_row = trained(*response_logprobs(model, collate_packed([rows], 0)))
        # No mask at all: transformers finds the samples from the restarting positions, and windows them itself.
        by_positions = trained(*response_logprobs(model, collate_packed([rows], 0, attention="position_ids")))
    assert_close(padded, expected)
    assert_close(by_positions, expected)
    # Row-major order of the packed rows is the samples' order here (rows[:2] then rows[2:]).
    assert_close(packed, expected)
    assert_close(packed_one_row, expected)
    # The window matters: the same weights without it give other logprobs.
    unwindowed = tiny_lm(kind, window=None)
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = trained(*response_logprobs(unwindowed, collate_padded(rows, 0)))
    assert (full - padded).abs().max() > 1e-3


def shared_prompt_rollout() -> Rollout:
    """Two prompts (12 and 5 tokens, left-padded) with three completions each (up to 8 tokens, right-padded)."""
    generator = torch.Generator().manual_seed(2)
    prompts, completions = [12, 12, 12, 5, 5, 5], [8, 3, 6, 8, 1, 5]
    prompt_ids = torch.randint(1, VOCAB, (2, 12), generator=generator).repeat_interleave(3, dim=0)
    completion_ids = torch.randint(1, VOCAB, (6, 8), generator=generator)
    prompt_mask, response_mask = torch.zeros_like(prompt_ids), torch.zeros_like(completion_ids)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        prompt_mask[i, 12 - p:] = 1
        response_mask[i, :c] = 1
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   response_mask=response_mask, logprobs=torch.zeros(completion_ids.shape),
                   finish_reasons=["length"] * 6, texts=[""] * 6, prompt_index=torch.arange(6), temperature=1.0)


@pytest.mark.parametrize("share_prompts", [False, True], ids=["own-prompts", "shared-prompts"])
def test_packed_rollout_logprobs_and_values_of_a_windowed_model_equal_the_padded(share_prompts):
    model, rollout = tiny_lm("gemma2"), shared_prompt_rollout()
    with torch.no_grad():
        padded, _ = policy_logprobs_and_entropy(model, rollout)
        packed, _ = packed_logprobs_and_entropy(model, rollout, capacity=24, share_prompts=share_prompts)
    assert_close(packed, padded)
    # A separate windowed critic on the packed layout: the values the padded layout gives.
    torch.manual_seed(3)
    critic = AutoModelForSequenceClassification.from_config(tiny_config("qwen2", WINDOW, num_labels=1)).eval()
    actor_critic = ActorCritic(model, critic).eval()
    layout = pack_rollout(rollout, 24, share_prompts=share_prompts)
    width = rollout.completion_ids.shape[1]
    with torch.no_grad():
        logits, values = actor_critic(layout.input_ids, layout.attention_mask, layout.position_ids,
                                      keep=layout.sources)
        padded_logits, padded_values = actor_critic(rollout.input_ids, rollout.attention_mask,
                                                    rollout.position_ids, keep=width + 1)
    mask = rollout.response_mask.bool()
    assert_close(layout.scatter(values)[mask], padded_values[:, :-1][mask])
    assert_close(logits[0], padded_logits[:, :-1][layout.target_rows, layout.target_cols])


def test_packed_reward_scores_of_a_windowed_model_equal_the_padded():
    torch.manual_seed(4)
    model = AutoModelForSequenceClassification.from_config(tiny_config("mistral", WINDOW, num_labels=1)).eval()
    rows = samples()
    with torch.no_grad():
        padded = sequence_scores(model, collate_padded(rows, 0))
        packed = sequence_scores(model, collate_packed([rows[:1], rows[1:]], 0))
    assert_close(packed, padded)


def test_layer_types_a_4d_mask_cannot_express_are_refused():
    model = tiny_lm("qwen2")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    batch = collate_packed([samples()], 0)
    with pytest.raises(ConfigError, match="chunked_attention"):
        layer_attention_mask(model, batch["attention_mask"], batch["position_ids"])
    # A padded batch's 2-D mask is left to transformers.
    padded = collate_padded(samples(), 0)
    assert layer_attention_mask(model, padded["attention_mask"], padded["position_ids"]) is padded["attention_mask"]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_shared_prompt_logprobs_and_rewards_of_a_windowed_model_equal_the_padded(kind):
    """Pairs whose answers share a 9-token prompt, laid out once (`collate_shared_prompts`): the window counts the
    positions through the shared prefix, as each sequence alone does."""
    from posttrain.data.collate import collate_shared_prompts

    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, VOCAB, (9,), generator=generator).tolist()
    rows = [{"input_ids": prompt + torch.randint(1, VOCAB, (n,), generator=generator).tolist(),
             "response_mask": [0] * 9 + [1] * n} for n in (6, 3, 8)]
    model = tiny_lm(kind)
    expected = torch.cat([alone(model, s) for s in rows])
    shared = collate_shared_prompts(rows, 0)
    assert shared["input_ids"].shape == (1, 9 + 6 + 3 + 8)
    with torch.no_grad():
        assert_close(trained(*response_logprobs(model, shared)), expected)
    torch.manual_seed(4)
    scorer = AutoModelForSequenceClassification.from_config(tiny_config(kind, WINDOW, num_labels=1)).eval()
    with torch.no_grad():
        assert_close(sequence_scores(scorer, shared), sequence_scores(scorer, collate_padded(rows, 0)))
