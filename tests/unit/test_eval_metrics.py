"""`posttrain eval`'s estimators against slow obvious implementations, and its held-out guarantee."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from posttrain.data.config import DataConfig
from posttrain.data.tasks import get_task
from posttrain.data.tokenize import Encoder
from posttrain.errors import RunDirError
from posttrain.eval.accuracy import heldout_problems
from posttrain.eval.evaluate import EvalOptions, load_policy, resolve_target, sampled_metrics
from posttrain.eval.headroom import headroom, headroom_captured, headroom_lines, headroom_rows, pass_at_k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_stays_exact_where_the_binomials_are_huge():
    # 1 - C(150, 100) / C(200, 100), with the binomials as exact integers.
    expected = 1 - math.comb(150, 100) / math.comb(200, 100)
    assert pass_at_k(200, 50, 100) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 5, 1)


@pytest.mark.parametrize("task_name", ["arith", "multistep"])
def test_heldout_problems_never_appear_in_a_training_set(task_name):
    task = get_task(task_name)
    heldout = heldout_problems(task, 500, seed=1234)
    assert len({e.key for e in heldout}) == 500
    for seed in (0, 1):
        train = {e.key for e in task.examples("train", size=20_000, seed=seed)}
        assert not train & {e.key for e in heldout}


def test_resolve_target_names_the_path_it_cannot_use(tmp_path):
    with pytest.raises(RunDirError) as err:
        resolve_target(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "config.yaml").write_text("stage: sft\n")
    with pytest.raises(RunDirError, match="no final model"):
        resolve_target(tmp_path)
    checkpoint = tmp_path / "checkpoints" / "step-4"  # an RL checkpoint: actor (and critic) tensors, no HF config
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "model" / "model.safetensors").write_bytes(b"")
    (checkpoint / "config.yaml").write_text(f"stage: grpo\nmodel:\n  path: {tmp_path / 'gone'}\n")
    (checkpoint / "COMPLETE").write_text("4")
    target = resolve_target(checkpoint)
    assert target.actor_tensors and target.model_dir == checkpoint / "model" and not target.is_reward_model
    with pytest.raises(RunDirError, match="rebuilt on the model the run started from") as err:
        load_policy(target)
    assert str(checkpoint) in str(err.value) and str(tmp_path / "gone") in str(err.value)


def _slow_sequence_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) from one unpadded forward of the plain sequence."""
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion))


@torch.no_grad()
def test_sampled_kl_and_rewards_match_a_slow_recomputation(tokenizer, tiny_model):
    from posttrain.config import ModelConfig
    from posttrain.models import build_model
    from posttrain.rollout import make_engine
    from posttrain.rollout.base import SamplingParams

    task = get_task("arith")
    reference = build_model(ModelConfig(size="tiny"), tokenizer, seed=1).eval()
    model = tiny_model.eval()
    options = EvalOptions(task="arith", problems=6, samples=3, pass_k=(1, 3), rewards=("format",), batch_size=6)
    draw = heldout_problems(task, options.problems, options.seed)
    result, counts = sampled_metrics(model, tokenizer, task, draw, DataConfig(), options, 6, reference)

    # The same samples again (each problem's seed is the draw's seed plus its index), each problem sampled alone
    # (the evaluation sampled two at a time), scored one sequence at a time.
    encoder = Encoder.from_config(tokenizer, DataConfig())
    examples = heldout_problems(task, 6, options.seed)
    prompts = [encoder.encode_prompt([{"role": "user", "content": e.prompt}]) for e in examples]
    kls, formats, correct = [], [], [0] * 6
    for problem, prompt in enumerate(prompts):
        rollout = make_engine("local", model, tokenizer).generate(
            [prompt], SamplingParams(max_new_tokens=6, temperature=1.0, n=3, prompt_seeds=(options.seed + problem,)))
        for row in range(len(rollout.texts)):
            completion = rollout.completion_ids[row][rollout.response_mask[row].bool()].tolist()
            kls.append(_slow_sequence_logprob(model, prompt, completion)
                       - _slow_sequence_logprob(reference, prompt, completion))
            formats.append(task.extract_answer(rollout.texts[row]) is not None)
            correct[problem] += int(task.verify(rollout.texts[row], examples[problem].answer))
    assert result["kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-4)
    assert result["reward_format"] == pytest.approx(sum(formats) / len(formats), abs=1e-12)
    assert result["samples_per_problem"] == 3 and set(result) >= {"pass@1", "pass@3"}

    assert counts == correct
    # Another batch size (all six problems in one call) samples the same: the same metrics (the KL's float sums in
    # another order).
    wide, wide_counts = sampled_metrics(model, tokenizer, task, draw, DataConfig(),
                                        dataclasses.replace(options, batch_size=18), 6, reference)
    assert wide_counts == counts and wide["reward_format"] == result["reward_format"]
    assert wide["kl"] == pytest.approx(result["kl"], rel=1e-5)
    same, _ = sampled_metrics(model, tokenizer, task, draw, DataConfig(), options, 6, model)
    assert abs(same["kl"]) < 1e-5


def test_headroom_per_category_by_hand():
    categories = ["+", "*", "+", None, "*"]  # None: counted in "all" only
    counts = [4, 0, 2, 1, 3]  # correct samples out of 4
    greedy = (True, False, False, True, True)
    table = headroom(categories, counts, 4, [1, 4], greedy)
    assert set(table) == {"all", "+", "*"}
    plus = table["+"]
    assert plus["problems"] == 2 and plus["accuracy"] == 0.5
    assert plus["sampled_accuracy"] == (4 + 2) / 8
    assert plus["pass@1"] == pytest.approx((1 + 0.5) / 2) and plus["pass@4"] == 1.0
    assert plus["intermediate_share"] == 0.5  # 2 of 4 disagree; 4 of 4 does not
    times = table["*"]
    assert times["sampled_accuracy"] == 3 / 8 and times["pass@4"] == 0.5 and times["intermediate_share"] == 0.5
    everything = table["all"]
    assert everything["problems"] == 5 and everything["accuracy"] == 0.6
    assert everything["sampled_accuracy"] == 10 / 20 and everything["pass@4"] == 0.8
    assert everything["intermediate_share"] == 3 / 5
    assert "accuracy" not in headroom(categories, counts, 4, [4])["all"]  # greedy not measured
    # One sample per problem cannot disagree with itself: no share is reported (not a share of 0), and the report's
    # table leaves its cell empty.
    single = headroom(categories, [1, 0, 1, 0, 1], 1, [1], greedy)
    assert single["all"]["sampled_accuracy"] == single["all"]["pass@1"] == 3 / 5
    assert all("intermediate_share" not in entry for entry in single.values())
    rows = headroom_rows({"one": {"headroom": single}}, {"one": None})
    assert [line.split("|")[7].strip() for line in headroom_lines(rows)[7:]] == ["", "", ""]
    # The share of headroom captured: from sampled 0.5 towards pass@4 0.8, to 0.65 is half of it.
    assert headroom_captured(everything, {"sampled_accuracy": 0.65}, "sampled_accuracy", "pass@4") == pytest.approx(0.5)
    assert headroom_captured({"sampled_accuracy": 1.0, "pass@4": 1.0}, {"sampled_accuracy": 1.0}, "sampled_accuracy",
                             "pass@4") is None  # nothing left to capture


def test_paired_interval_by_hand():
    """Bonett & Price's adjusted Wald interval for paired proportions, from the discordant counts: n12 problems
    fixed, n21 broken, of n; p12 = (n12 + 1) / (n + 2), p21 = (n21 + 1) / (n + 2), d = p12 - p21,
    d +- z sqrt((p12 + p21 - d^2) / (n + 2))."""
    from posttrain.eval.accuracy import paired_interval

    def by_hand(fixed: int, broken: int, n: int) -> tuple[float, float]:
        p12, p21 = (fixed + 1) / (n + 2), (broken + 1) / (n + 2)
        d = p12 - p21
        half = 1.959964 * math.sqrt((p12 + p21 - d * d) / (n + 2))
        return max(-1.0, d - half), min(1.0, d + half)

    before = [0, 1, 1, 0, 1, 0, 0, 1]
    after = [1, 1, 1, 1, 1, 0, 0, 1]  # two problems fixed, none broken: d = (1, 0, 0, 1, 0, 0, 0, 0)
    mean, low, high = paired_interval(before, after)
    assert mean == 0.25 and (low, high) == pytest.approx(by_hand(2, 0, 8))
    # Every difference equal: the unadjusted interval had no width ("+100% (+100% to +100%)" from 2 problems)
    mean, low, high = paired_interval([0, 0], [1, 1])
    assert mean == 1.0 and (low, high) == pytest.approx(by_hand(2, 0, 2)) and low < 0
    mean, low, high = paired_interval(before, before)
    assert mean == 0.0 and (low, high) == pytest.approx(by_hand(0, 0, 8)) and low < 0 < high
    fixed = [0] * 300 + [1] * 200
    assert paired_interval(fixed, [0] * 200 + [1] * 300)[1:] == pytest.approx(by_hand(100, 0, 500))
    with pytest.raises(ValueError, match="same problems"):
        paired_interval(before, after[:3])
