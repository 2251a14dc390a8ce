"""Rejection sampling: selection keeps exactly the best samples, pass@N by hand, weighted likelihood with 0/1
weights is SFT on the rows weighted 1, and a run trains on exactly the completions it marked kept."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoTokenizer

from posttrain.config import load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.recipes import find_recipe
from posttrain.recipes.rejection import RejectionConfig, main, pass_at_n, select_kept
from posttrain.recipes.sft import sft_loss_fn, step_source
from posttrain.rewards.functions import register_reward_function
from posttrain.train.engine import TrainConfig
from posttrain.train.metrics import read_metrics
from posttrain.train.signals import StoppedInTraining


def test_select_best_keeps_the_top_finished_sample_of_each_prompt():
    rewards = torch.tensor([0.2, 0.9, 0.9, 0.1, 1.0, 0.3, 0.5, 0.4, 0.0], dtype=torch.float64)
    prompts = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    finished = torch.tensor([True, True, True, True, False, True, True, True, True])
    texts = list("abcdefghi")
    # prompt 0: tie 0.9 -> the first sampled (row 1); prompt 1: row 4 is cut short -> row 5; prompt 2: row 6.
    assert select_kept(rewards, prompts, texts, finished, "best", threshold=0.0) == [1, 5, 6]
    # A prompt whose best is below the threshold keeps nothing.
    assert select_kept(rewards, prompts, texts, finished, "best", threshold=0.45) == [1, 6]


def test_select_threshold_keeps_every_sample_above_it_once():
    rewards = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)
    prompts = torch.tensor([0, 0, 0, 1, 1, 1])
    finished = torch.ones(6, dtype=torch.bool)
    texts = ["5", "5", "6", "7", "x", "8"]
    assert select_kept(rewards, prompts, texts, finished, "threshold", 1.0) == [0, 3, 5]
    assert select_kept(rewards, prompts, texts, finished, "threshold", 1.0, dedupe=False) == [0, 1, 3, 5]
    assert select_kept(rewards, prompts, texts, finished, "threshold", 0.5) == [0, 2, 3, 5]


def test_pass_at_n_by_hand():
    assert pass_at_n([0, 1, 0, 0, 0, 0, 1, 1], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])) == 2 / 4


def test_zero_one_weights_are_sft_on_the_rows_weighted_one(tiny_model, tokenizer):
    rows = [{"prompt": f"What is {a}+{a}?", "completion": str(2 * a)} for a in range(1, 7)]
    weights = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    data = DataConfig(source="<rows>")
    train = TrainConfig(batch_size=6, micro_batch_size=6)
    weighted = step_source(prepare_data(data, tokenizer, accepts=("completion",), rows=rows), train, 0, weights)
    kept = [r for r, w in zip(rows, weights, strict=True) if w]
    plain = step_source(prepare_data(data, tokenizer, accepts=("completion",), rows=kept),
                        TrainConfig(batch_size=3, micro_batch_size=3), 0)
    w_step, p_step = weighted.next_step(), plain.next_step()
    assert w_step.normaliser == p_step.normaliser  # trained tokens of the kept rows only
    w_loss, _ = sft_loss_fn(tiny_model, w_step.micro_batches[0], w_step.normaliser)
    p_loss, _ = sft_loss_fn(tiny_model, p_step.micro_batches[0], p_step.normaliser)
    assert_close(w_loss, p_loss)


def test_rejection_run_trains_on_exactly_the_kept_best(pretrained_run, tmp_path):
    overrides = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                 "run.log_every=1",
                 "train.save_every=0", "data.size=32", "prompts_per_round=6", "rounds=2", "train.max_steps=2",
                 "train.batch_size=4", "train.micro_batch_size=4", "sampling.samples_per_prompt=4",
                 "sampling.max_new_tokens=8", "select.threshold=0", "reward.functions={format: 1.0}",
                 "eval.problems=4", "eval.max_new_tokens=4", "eval_before=false"]
    result = main(load_config(RejectionConfig, find_recipe("rejection").path, overrides))
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    rounds = [s for s in samples if "round" in s]
    assert {s["round"] for s in rounds} == {1, 2} and len(rounds) == 2 * 6 * 4
    for r in (1, 2):
        for group in range(6):
            members = [s for s in rounds if s["round"] == r and s["group"] == group]
            finished = [s for s in members if s["finish_reason"] != "length"]
            kept = [s for s in members if s["kept"]]
            assert len(kept) == (1 if finished else 0)
            if kept:
                assert kept[0]["reward"] == max(s["reward"] for s in finished)
                assert kept[0] is next(s for s in finished if s["reward"] == kept[0]["reward"])
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    by_round = {m["round"]: m for m in metrics}
    for r in (1, 2):
        members = [s for s in rounds if s["round"] == r]
        assert by_round[r]["kept_fraction"] == pytest.approx(sum(s["kept"] for s in members) / len(members))
        assert 0 <= by_round[r]["pass_at_n"] <= 1
    assert result.summary["rounds"] == 2 and len(result.summary["per_round"]) == 2
    assert (result.final_dir / "config.json").is_file()



def test_completions_no_sft_row_can_hold_are_never_kept(pretrained_run, tmp_path, monkeypatch):
    """A model may end at once, sample only special tokens (decoded to nothing) or open a <think> it never
    closes, and a reward may score that highest. Kept, it stopped the round at tokenisation ("<rows>:2:
    completion: empty completion"); now the best completion an SFT row can hold is kept. The engine's samples
    are rewritten, per prompt: "", "<think>so", "5", "6", every one finished."""
    import posttrain.recipes.rejection as rejection

    texts, reasons = ["", "<think>so", "5", "6"], ["stop"] * 4

    class Rewritten:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, prompts, params, **kwargs):
            rollout = self.engine.generate(prompts, params, **kwargs)
            rows = len(rollout.texts)
            return dataclasses.replace(rollout, texts=texts * (rows // 4), finish_reasons=reasons * (rows // 4))

        def __getattr__(self, name):
            return getattr(self.engine, name)

    make_engine = rejection.make_engine
    monkeypatch.setattr(rejection, "make_engine", lambda *args: Rewritten(make_engine(*args)))
    register_reward_function("test_rejection_prefers_no_answer")(
        lambda batch: [{"": 3.0, "<think>so": 2.0, "5": 1.0}.get(t, 0.5) for t in batch.completions])
    overrides = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                 "train.save_every=0", "data.size=32", "prompts_per_round=4", "rounds=1", "train.max_steps=1",
                 "train.batch_size=2", "train.micro_batch_size=2", "sampling.samples_per_prompt=4",
                 "sampling.max_new_tokens=4", "select.threshold=0",
                 "reward.functions={test_rejection_prefers_no_answer: 1.0}", "eval.problems=0", "eval_before=false"]
    result = main(load_config(RejectionConfig, find_recipe("rejection").path, overrides))
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    kept = [s["completion"] for s in samples if s.get("kept")]
    assert kept == ["5"] * 4


def test_a_resume_inside_a_round_samples_that_round_again_and_keeps_the_run_s_rounds(pretrained_run, tmp_path,
                                                                                    monkeypatch):
    """Ctrl-C in the middle of round 2 (its checkpoint holds no pairs): the resumed run samples round 2 again, from
    the checkpoint's model, for its remaining step — 2 rounds and 4 steps in all, not a third round."""
    import os
    import signal

    from posttrain.errors import ConfigError
    from posttrain.recipes import rejection

    overrides = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                 "run.log_every=1", "train.save_every=0", "data.size=32", "prompts_per_round=6", "rounds=2",
                 "train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=4",
                 "sampling.samples_per_prompt=4", "sampling.max_new_tokens=8", "select.threshold=0",
                 "reward.functions={format: 1.0}", "eval.problems=4", "eval.max_new_tokens=4", "eval_before=false"]
    calls, loss_fn = {"n": 0}, rejection.sft_loss_fn

    def stopping_at_step_3(model, batch, normaliser):
        calls["n"] += 1
        if calls["n"] == 3:  # round 2's first step: it finishes, then the run stops with a checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_fn(model, batch, normaliser)

    monkeypatch.setattr(rejection, "sft_loss_fn", stopping_at_step_3)
    with pytest.raises(StoppedInTraining) as stopped:
        main(load_config(RejectionConfig, find_recipe("rejection").path, overrides))
    assert stopped.value.step == 4  # the stop waited for the round's last step
    monkeypatch.undo()
    resumed = main(load_config(RejectionConfig, find_recipe("rejection").path, [*overrides, "run.resume=true"]))
    metrics = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [(m["step"], m["round"]) for m in metrics] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert resumed.summary["rounds"] == 2 and resumed.summary["steps"] == 4
    # Each round drawn once (a stop inside round 2 once drew it again for its last step).
    samples = [json.loads(line) for line in (resumed.run_dir / "samples.jsonl").read_text().splitlines()]
    draws = sorted({(s["round"], s["step"]) for s in samples if "round" in s})
    assert draws == [(1, 1), (2, 3)]
    with pytest.raises(ConfigError, match="between rounds") as err:  # a periodic checkpoint inside a round
        rejection.check_config(load_config(RejectionConfig, find_recipe("rejection").path,
                                           [*overrides, "train.save_every=3"]))
    assert err.value.field == "train.save_every"
    rejection.check_config(load_config(RejectionConfig, find_recipe("rejection").path,
                                       [*overrides, "train.save_every=2"]))


def test_rows_a_reward_failed_on_are_never_kept_and_long_answers_are_not_dropped(pretrained_run, tmp_path,
                                                                                 monkeypatch):
    """A failed row scores 0: it beat every real (negative) score and passed any threshold <= 0, and trained. And
    the kept rows (prompt + completion) were cut at data.max_length, the longest *prompt*: the longest answers
    were dropped first while `kept` still counted them."""
    def negative_or_failing(batch):
        if any(c.startswith("1") for c in batch.completions):
            raise ValueError("cannot score this one")
        return [-1.0 - len(c) / 100 for c in batch.completions]

    register_reward_function("test_rejection_negative_or_failing")(negative_or_failing)
    overrides = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                 "train.save_every=0", "prompts_per_round=8", "rounds=1", "train.max_steps=1",
                 "train.batch_size=4", "train.micro_batch_size=4", "sampling.samples_per_prompt=4",
                 "sampling.max_new_tokens=12", "select.mode=threshold", "select.threshold=-100",
                 "reward.functions={test_rejection_negative_or_failing: 1.0}", "reward.max_error_fraction=1",
                 "eval.problems=0", "eval_before=false"]
    import posttrain.recipes.rejection as rejection

    trained, step_source = [], rejection.step_source
    monkeypatch.setattr(rejection, "step_source", lambda prepared, *args: trained.append(len(prepared.dataset))
                        or step_source(prepared, *args))
    # Prompts of one length, and data.max_length exactly that: every prompt + answer row is longer.
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n"
                            for a in range(11, 19) for b in range(21, 25)))
    overrides = [*overrides, f"data.source={data}"]
    tokenizer = AutoTokenizer.from_pretrained(pretrained_run.final_dir)
    lengths = {len(row["prompt_input_ids"]) for row in prepare_data(
        load_config(RejectionConfig, find_recipe("rejection").path, overrides).data, tokenizer,
        accepts=STAGE_FORMATS["rejection"]).dataset}
    assert len(lengths) == 1
    result = main(load_config(RejectionConfig, find_recipe("rejection").path,
                              [*overrides, f"data.max_length={lengths.pop()}"]))
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    rounds = [s for s in samples if "round" in s]
    failed = [s for s in rounds if "error" in s]
    assert failed and not any(s["kept"] for s in failed)
    kept = [s for s in rounds if s["kept"]]
    assert kept and all(s["finish_reason"] != "length" and s["reward"] < 0 for s in kept)
    assert result.summary["per_round"][0]["kept"] == len(kept) == trained[0]  # every kept row trains


def test_kept_samples_keep_their_rows_tools_and_are_sft_rows_again(chatml_model_dir, chatml_tokenizer, tmp_path,
                                                                   monkeypatch):
    """samples.jsonl kept a tool row's prompt without its `tools`: fed back to `posttrain sft`, a kept completion
    rendered without the tool schemas its prompt was sampled (and the round trained) with."""
    from posttrain.recipes import rejection
    from posttrain.rollout import RolloutEngine, text_rollout

    class Answering(RolloutEngine):  # finished answers from the random model (it would rarely end one)
        def update_weights(self, model) -> None:
            pass

        def generate(self, prompts, params, generator=None):
            return text_rollout(prompts, [["Answer: 7"] * params.n for _ in prompts], chatml_tokenizer)

    monkeypatch.setattr(rejection, "make_engine", lambda name, model, tokenizer: Answering())
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    path = tmp_path / "tool_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a}+3?"}],
                                        "answer": str(a + 3), "tools": tools}) + "\n" for a in range(4)))
    result = main(load_config(RejectionConfig, find_recipe("rejection").path, [
        f"model.path={chatml_model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", f"data.source={path}",
        "train.save_every=0", "prompts_per_round=4", "rounds=1", "train.max_steps=1", "train.batch_size=2",
        "train.micro_batch_size=2", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=4",
        "select.threshold=0", "select.mode=threshold", "reward.functions={format: 1.0}", "reward.task=arith",
        "eval.problems=0",
        "eval_before=false"]))
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    kept = [s for s in samples if s.get("kept")]
    assert kept and all(s["tools"] == tools for s in samples)
    again = tmp_path / "kept.jsonl"
    again.write_text("".join(json.dumps({k: s[k] for k in ("prompt", "completion", "tools")}) + "\n" for s in kept))
    rendered = prepare_data(DataConfig(source=str(again)), chatml_tokenizer, accepts=STAGE_FORMATS["sft"])
    assert "<tools>" in chatml_tokenizer.decode(rendered.dataset[0]["input_ids"])


def test_a_prompt_sampled_in_two_groups_of_a_round_keeps_an_identical_completion_once(tokenizer):
    """A round of more prompts than the data samples a row in two groups: select.dedupe kept the same (prompt,
    completion) once per group, twice in the round, and `best` one per group."""
    from posttrain.recipes.rejection import distinct_prompts
    from posttrain.rollout import text_rollout

    rollout = text_rollout([[5, 6], [7], [5, 6]], [["12", "12"], ["3", "4"], ["12", "13"]], tokenizer)
    assert distinct_prompts(rollout).tolist() == [0, 0, 1, 1, 0, 0]
    rewards = torch.tensor([1.0, 1.0, 0.5, 0.9, 1.0, 0.8], dtype=torch.float64)
    finished = torch.ones(6, dtype=torch.bool)
    kept = select_kept(rewards, distinct_prompts(rollout), rollout.texts, finished, "threshold", threshold=0.7)
    assert kept == [0, 3, 5]  # "12" once for the prompt [5, 6], though three of its samples wrote it
    assert select_kept(rewards, distinct_prompts(rollout), rollout.texts, finished, "best", threshold=0.0) == [0, 3]
