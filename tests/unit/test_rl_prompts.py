"""The prompt stream of the RL recipes: a single process keeps its sampling seeds, and under torchrun each rank
samples with a seed of its own."""

from __future__ import annotations

import torch

from posttrain.data.schemas import holds_as_answer
from posttrain.recipes.rl import PromptStream, preference_rows
from posttrain.rewards.functions import Completions, Scores
from posttrain.rollout import RolloutEngine
from posttrain.train import dist


class SeedRecorder(RolloutEngine):
    """Records the prompts and the first random number of each round's generator instead of sampling."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, float]] = []

    def update_weights(self, model) -> None:
        pass

    def generate(self, prompts, params, generator=None):
        self.calls.append((list(prompts), torch.rand(1, generator=generator).item()))


def draws(seed: int, rounds: int = 2) -> list[tuple[list, float]]:
    dataset = [{"prompt_input_ids": [i, i + 1]} for i in range(8)]
    stream, engine = PromptStream(dataset, per_round=2, seed=seed), SeedRecorder()
    for _ in range(rounds):
        stream.sample(engine, params=None)
    return engine.calls


def first_draw(seed: int) -> float:
    return torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()


def test_a_single_process_seeds_round_r_with_seed_times_1000003_plus_r():
    calls = draws(seed=3)
    assert [draw for _, draw in calls] == [first_draw(3_000_009), first_draw(3_000_010)]
    assert all(len(prompts) == 2 for prompts, _ in calls)


def test_each_rank_samples_its_share_of_the_prompts_with_its_own_seed(monkeypatch):
    single = draws(seed=3)
    monkeypatch.setattr(dist, "context", lambda: dist.DistContext(rank=0, world_size=2))
    rank0 = draws(seed=3)
    monkeypatch.setattr(dist, "context", lambda: dist.DistContext(rank=1, world_size=2))
    rank1 = draws(seed=3)
    assert [d for _, d in rank0] == [first_draw(3_000_009), first_draw(3_000_010)]  # rank 0: unchanged
    for r in range(2):  # the two ranks' prompts together are the single process's round
        assert rank0[r][0] + rank1[r][0] == single[r][0]
    assert [d for _, d in rank1] == [first_draw(3_000_009 + 1_000_000_007), first_draw(3_000_010 + 1_000_000_007)]


def test_preference_rows_pair_only_completions_a_training_row_can_hold():
    """A sampled completion that is empty or has a stray <think> tag is no answer of a preference row: the best and
    worst of each prompt are found among the others (a model can sample anything; the round must not fail)."""
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    texts = ["4", "the answer <think> is 5", "5", "",  # prompt 0: best "4"; the stray tag and "" are left out
             "<think>2+2=4</think>4", "3"]  # prompt 1: a thinking block that opens the turn is an answer
    completions = Completions(prompts=[prompt] * 6, completions=texts, answers=["4"] * 6, steps=[[]] * 6,
                              columns=[{}] * 6)
    scores = torch.tensor([1.0, 9.0, 0.0, -9.0, 1.0, 0.0])
    prompt_index = torch.tensor([0, 0, 0, 0, 1, 1])
    rows = preference_rows(completions, Scores(scores, {}), prompt_index, min_margin=0.0)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("4", "5"), ("<think>2+2=4</think>4", "3")]
    assert holds_as_answer("4") and not holds_as_answer("a <think> b") and not holds_as_answer("  ")


def test_preference_rows_leave_out_completions_whose_reward_failed():
    """A completion some reward failed on scored 0 for it: no score, so neither the chosen nor the rejected one (a
    right answer whose grader timed out would otherwise be the rejected one)."""
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    texts = ["4", "5", "four", "3"]
    completions = Completions(prompts=[prompt] * 4, completions=texts, answers=["4"] * 4, steps=[[]] * 4,
                              columns=[{}] * 4)
    scores = Scores(torch.tensor([1.0, 0.5, 0.0, 0.2]), {},
                    errors=[{"function": "grader", "row": 2, "error": "TimeoutError"}])
    rows = preference_rows(completions, scores, torch.zeros(4, dtype=torch.long), min_margin=0.0)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("4", "3")]
    assert scores.failed().tolist() == [False, False, True, False]


def test_a_round_is_sampled_in_parts_of_at_most_max_sequences_from_its_one_stream():
    """The whole round went to the engine in one call: 512 prompts x 8 samples of a real model's KV cache at once,
    with no setting to bound it and a progress bar that moved once, at the end."""
    from types import SimpleNamespace

    from posttrain.rollout import text_rollout

    class Tokens:  # text_rollout's tokenizer: one id per character, EOS 0
        eos_token_id, pad_token_id = 0, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    class Parts(RolloutEngine):
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def update_weights(self, model) -> None:
            pass

        def generate(self, prompts, params, generator=None):
            self.sizes.append(len(prompts) * params.n)
            draws = torch.randint(10, (len(prompts), params.n), generator=generator).tolist()
            texts = [[f"{p[0]}:{d}" for d in row] for p, row in zip(prompts, draws, strict=True)]
            return text_rollout(prompts, texts, Tokens())

    dataset = [{"prompt_input_ids": [i + 1, 99]} for i in range(8)]
    params = SimpleNamespace(n=2)
    advanced: list[int] = []
    whole, parts = Parts(), Parts()
    one = PromptStream(dataset, per_round=5, seed=4).sample(whole, params)
    rows, rollout = PromptStream(dataset, per_round=5, seed=4, max_sequences=4).sample(parts, params,
                                                                                      advanced.append)
    assert whole.sizes == [10] and parts.sizes == [4, 4, 2] and advanced == [2, 2, 1]
    assert rows == one[0] and rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # one random stream, in order: the parts draw what the whole round drew, row by row
    assert rollout.texts == one[1].texts
