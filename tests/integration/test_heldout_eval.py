"""Held-out evaluation of a user's own data: the rows data.eval_split holds out are never trained on, SFT reports
their NLL per token (and an eval.source file's) without any built-in task evaluation, DPO's held-out loss is the
DPO loss of those pairs computed independently, GRPO's held-out reward is the stage's reward of greedy
completions; and each phase of a run names itself on the run's progress display."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.errors import ConfigError
from posttrain.eval import heldout
from posttrain.models import build_model, save_pretrained
from posttrain.recipes import find_recipe
from posttrain.rewards.functions import register_reward_function
from posttrain.rollout import make_engine
from posttrain.rollout.base import SamplingParams
from posttrain.train.metrics import read_metrics
from posttrain.train.progress import RunProgress

FAST = ["run.progress=false", "train.save_every=0", "optim.warmup_steps=0", "train.max_steps=2",
        "train.batch_size=8", "train.micro_batch_size=4", "eval.samples=2"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def completion_rows(count: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i + 3}?", "completion": f"It is {2 * i + 3}."}
            for i in range(offset, offset + count)]


@pytest.fixture()
def no_task_evaluation(monkeypatch):
    """A user's own data never gets a built-in task's evaluation: any call to it fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("a built-in task was evaluated on a user's own data")

    monkeypatch.setattr(heldout, "heldout_accuracy", fail)


def nll_per_token(model, prepared) -> float:
    """Masked NLL per trained token, row by row without padding: the obvious loop."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in prepared.dataset:
            ids, mask = torch.tensor(row["input_ids"]), torch.tensor(row["response_mask"])
            logprobs = F.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
            picked = logprobs.gather(-1, ids[1:, None])[:, 0]
            total -= float((picked * mask[1:]).sum())
            tokens += int(mask[1:].sum())
    return total / tokens


def test_the_split_is_seeded_disjoint_and_whole(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", completion_rows(40))
    data = DataConfig(source=source, eval_split=0.1, seed=3)

    def lines(**kwargs):
        prepared = prepare_data(data, tokenizer, accepts=STAGE_FORMATS["sft"], **kwargs)
        return list(prepared.dataset["line"])

    trained, held = lines(), lines(heldout=True)
    assert len(held) == 4 and len(trained) == 36
    assert not set(trained) & set(held) and sorted(trained + held) == list(range(1, 41))
    assert lines(heldout=True) == held  # the same seed holds out the same rows
    other = prepare_data(DataConfig(source=source, eval_split=0.1, seed=4), tokenizer, accepts=STAGE_FORMATS["sft"],
                         heldout=True).dataset["line"]
    assert list(other) != held


def test_sft_reports_the_heldout_nll_of_its_split_and_runs_no_task_evaluation(lm_dir, tokenizer, tmp_path,
                                                                             no_task_evaluation):
    from posttrain.recipes.sft import SFTConfig, main

    source = write_jsonl(tmp_path / "mine.jsonl", completion_rows(40))
    cfg = load_config(SFTConfig, find_recipe("sft").path, [f"model.path={lm_dir}", f"run.out_dir={tmp_path}", *FAST,
                                                           f"data.source={source}", "data.eval_split=0.1"])
    result = main(cfg)
    last = read_metrics(result.run_dir / "metrics.jsonl")[-1]
    assert "eval_accuracy" not in last and "accuracy" not in result.summary
    rows = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["sft"], heldout=True)
    final = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True).eval()
    start = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True).eval()
    assert_close(torch.tensor(last["eval_loss"]), torch.tensor(nll_per_token(final, rows), dtype=torch.float32))
    summary = result.summary
    assert_close(torch.tensor(summary["eval_loss_before"]),
                 torch.tensor(nll_per_token(start, rows), dtype=torch.float32))
    assert summary["eval_loss"] == last["eval_loss"] and summary["eval_rows"] == 4
    assert summary["eval_perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    saved = json.loads((result.run_dir / "summary.json").read_text())["summary"]
    assert saved["eval_loss"] == last["eval_loss"]
    report = (result.run_dir / "report.md").read_text()
    assert "| eval loss before |" in report and "| eval loss |" in report


def test_sft_evaluates_an_eval_source_file(lm_dir, tmp_path, no_task_evaluation):
    from posttrain.recipes.sft import SFTConfig, main

    source = write_jsonl(tmp_path / "train.jsonl", completion_rows(24))
    held = write_jsonl(tmp_path / "held.jsonl", completion_rows(5, offset=100))
    cfg = load_config(SFTConfig, find_recipe("sft").path, [f"model.path={lm_dir}", f"run.out_dir={tmp_path}", *FAST,
                                                           f"data.source={source}", f"eval.source={held}",
                                                           "eval_before=false"])
    result = main(cfg)
    assert result.summary["eval_rows"] == 5 and math.isfinite(result.summary["eval_loss"])
    assert "eval_loss_before" not in result.summary and "accuracy" not in result.summary
    both = load_config(SFTConfig, None, [f"model.path={lm_dir}", f"data.source={source}", f"eval.source={held}",
                                         "data.eval_split=0.2"])
    with pytest.raises(ConfigError, match="not both"):
        heldout.heldout_data(both.data, both.eval)


def sequence_logprob(model, ids, mask) -> float:
    with torch.no_grad():
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        logprobs = F.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
        return float((logprobs.gather(-1, ids[1:, None])[:, 0] * mask[1:]).sum())


def test_dpo_heldout_loss_is_the_dpo_loss_of_the_heldout_pairs(lm_dir, tokenizer, tmp_path, no_task_evaluation):
    from posttrain.recipes.dpo import DPOConfig, main

    pairs = [{"prompt": f"What is {i} plus {i + 3}?", "chosen": f"It is {2 * i + 3}.", "rejected": f"It is {i}."}
             for i in range(40)]
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = load_config(DPOConfig, find_recipe("dpo").path, [f"model.path={lm_dir}", f"run.out_dir={tmp_path}", *FAST,
                                                           f"data.source={source}", "data.eval_split=0.1",
                                                           "loss.sft_weight=0", "optim.lr=1e-3"])
    result = main(cfg)
    summary, beta = result.summary, cfg.loss.beta
    # Before training the policy is the reference: h = 0 for every pair, so the loss is log 2.
    assert_close(torch.tensor(summary["eval_loss_before"]), torch.tensor(math.log(2)))
    assert summary["eval_reward_margin_before"] == 0.0
    rows = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["dpo"], heldout=True)
    policy = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True).eval()
    reference = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True).eval()
    losses, right = [], []
    for row in rows.dataset:
        logratio = {side: sequence_logprob(policy, row[f"{side}_input_ids"], row[f"{side}_response_mask"])
                    - sequence_logprob(reference, row[f"{side}_input_ids"], row[f"{side}_response_mask"])
                    for side in ("chosen", "rejected")}
        h = logratio["chosen"] - logratio["rejected"]
        losses.append(math.log1p(math.exp(-beta * h)))  # -log sigmoid(beta h)
        right.append(float(h > 0))
    assert len(losses) == 4 and summary["eval_rows"] == 4
    assert_close(torch.tensor(summary["eval_loss"]), torch.tensor(sum(losses) / 4, dtype=torch.float32))
    assert summary["eval_reward_accuracy"] == sum(right) / 4
    assert summary["eval_loss"] != summary["eval_loss_before"]
    assert "eval_accuracy" not in read_metrics(result.run_dir / "metrics.jsonl")[-1]


def test_kto_heldout_loss_is_half_while_the_policy_is_the_reference(lm_dir, tmp_path, no_task_evaluation):
    from pathlib import Path

    from posttrain.recipes.kto import KTOConfig, main

    example = Path(__file__).resolve().parents[2] / "examples" / "unpaired.jsonl"
    cfg = load_config(KTOConfig, find_recipe("kto").path, [f"model.path={lm_dir}", f"run.out_dir={tmp_path}", *FAST,
                                                           f"data.source={example}", "data.eval_split=0.25",
                                                           "optim.lr=1e-3"])
    summary = main(cfg).summary
    # Every implied reward r is 0 and so is z0: each row's loss is lambda (1 - sigmoid(0)) = 1/2.
    assert_close(torch.tensor(summary["eval_loss_before"]), torch.tensor(0.5))
    assert_close(torch.tensor(summary["eval_kl_before"]), torch.tensor(0.0))
    assert summary["eval_rows"] == 5 and summary["eval_loss"] != summary["eval_loss_before"]
    assert (summary["rows_desirable"] + summary["rows_undesirable"]) == 15


register_reward_function("test_digits")(lambda batch: [float(sum(c.isdigit() for c in text)) for text in
                                                       batch.completions])


def test_grpo_heldout_reward_is_the_reward_of_greedy_completions(lm_dir, tokenizer, tmp_path, no_task_evaluation):
    from posttrain.recipes.grpo import GRPOConfig, main

    rows = [{"prompt": f"What is {i} plus {i + 3}?", "answer": str(2 * i + 3)} for i in range(40)]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = load_config(GRPOConfig, find_recipe("grpo").path, [
        f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "train.save_every=0",
        "train.max_steps=1", "train.batch_size=8", "train.micro_batch_size=8", "sampling.samples_per_prompt=4",
        "sampling.max_new_tokens=6", f"data.source={source}", "data.eval_split=0.1", "eval.samples=2",
        "reward.functions={test_digits: 1.0}"])
    result = main(cfg)
    heldout_rows = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["grpo"], heldout=True)
    policy = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True).eval()
    engine = make_engine("local", policy, tokenizer)
    texts = engine.generate([r["prompt_input_ids"] for r in heldout_rows.dataset],
                            SamplingParams(max_new_tokens=6, temperature=0.0)).texts
    expected = sum(sum(c.isdigit() for c in text) for text in texts) / len(texts)
    summary = result.summary
    assert summary["eval_reward"] == pytest.approx(expected) and summary["eval_reward_test_digits"] == summary[
        "eval_reward"]
    assert "eval_reward_before" in summary and "accuracy" not in summary and summary["eval_rows"] == 4
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    evaluated = [s for s in samples if s.get("eval") == "heldout"]
    assert [s["step"] for s in evaluated] == [0, 0, 1, 1] and evaluated[-1]["completion"] == texts[1]


# ----------------------------------------------------------------------------------------------
# Progress: every phase names itself.


class RecordedBar:
    def __init__(self, total) -> None:
        self.total, self.done = total, 0

    def advance(self, amount=1) -> None:
        self.done += amount

    def update(self, completed=None, total=None, metrics=None) -> None:
        self.total = self.total if total is None else total
        self.done = self.done if completed is None else completed


class Recorder(RunProgress):
    """A display that records each phase: its name, its total and the work it reported done."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.phases: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def phase(self, description, total):
        bar = RecordedBar(total)
        yield bar
        self.phases.append((description, bar.total, bar.done))


def test_reference_evaluation_and_sampling_phases_report_progress(lm_dir, tmp_path, monkeypatch):
    from posttrain.recipes import dpo

    recorders: list[Recorder] = []

    def recorded(run, console=None):
        recorders.append(Recorder())
        return recorders[-1]

    monkeypatch.setattr(RunProgress, "for_run", staticmethod(recorded))
    dpo.main(load_config(dpo.DPOConfig, find_recipe("dpo").path, [
        f"model.path={lm_dir}", f"run.out_dir={tmp_path}", *FAST, "data.size=24", "eval.problems=3",
        "eval.batch_size=2", "eval.max_new_tokens=3"]))
    phases = recorders[-1].phases
    # Held-out problems in batches of 2, before and after; the 24 pairs' reference logprobs.
    assert [p for p in phases if p[0] == "evaluating arith"] == [("evaluating arith", 3, 3)] * 2
    assert ("reference logprobs", 24, 24) in phases
    from posttrain.recipes.grpo import GRPOConfig, main

    main(load_config(GRPOConfig, find_recipe("grpo").path, [
        f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "train.save_every=0",
        "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8", "sampling.samples_per_prompt=4",
        "sampling.max_new_tokens=4", "data.size=16", "eval.problems=2", "eval_before=false",
        "eval.max_new_tokens=3"]))
    phases = recorders[-1].phases
    assert [p for p in phases if p[0].startswith("sampling")] == [("sampling round 1: prompts", 2, 2),
                                                                  ("sampling round 2: prompts", 2, 2)]
