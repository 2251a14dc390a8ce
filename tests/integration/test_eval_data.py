"""Headroom per category of a user's own verifiable file, end to end: `posttrain eval <model> --data FILE` gives the
table a hand computation gives (pass@k against its definition, by enumerating every k-subset of the samples), on
the console and in eval.json with per-row results; a GRPO run whose eval.source rows have a `category` reports the
table before and after with the share of headroom captured in summary.json and report.md; and `posttrain eval
<run> --data FILE` scores with the run's own reward functions."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from posttrain import cli
from posttrain.cli import app
from posttrain.config import ModelConfig, load_config
from posttrain.eval.evaluate import EvalOptions, evaluate
from posttrain.models import build_model, save_pretrained
from posttrain.recipes import find_recipe
from posttrain.train.metrics import read_metrics

# A reward whose outcome the test controls: in a batch where a row's prompt appears once (a greedy batch) it
# scores the row's `greedy` column; where it appears n > 1 times (n samples of it) its first `wins` samples score 1
# and the others 0. So each row has exactly `wins` correct samples of n whatever the model writes.
SCRIPTED = '''
def scripted(batch):
    counts, seen, out = {}, {}, []
    for prompt in batch.prompts:
        counts[prompt[-1]["content"]] = counts.get(prompt[-1]["content"], 0) + 1
    for prompt, row in zip(batch.prompts, batch.columns):
        text = prompt[-1]["content"]
        index = seen.get(text, 0)
        seen[text] = index + 1
        if counts[text] == 1:
            out.append(float(row.get("greedy", 0)))
        else:
            out.append(1.0 if index < row.get("wins", 0) else 0.0)
    return out
'''

# (category, correct samples of 4, greedy correct)
ROWS = [("add", 4, 1), ("add", 0, 0), ("mul", 2, 0), (None, 1, 1), ("mul", 3, 1), ("add", 2, 1)]
N = 4


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def expected_table(ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    table = {}
    for name in ("all", "add", "mul"):
        mine = [(c, g) for category, c, g in ROWS if name == "all" or category == name]
        entry = {"problems": len(mine), "accuracy": sum(g for _, g in mine) / len(mine),
                 "sampled_accuracy": sum(c for c, _ in mine) / (N * len(mine))}
        entry |= {f"pass@{k}": sum(pass_at_k_by_enumeration(N, c, k) for c, _ in mine) / len(mine) for k in ks}
        entry["intermediate_share"] = sum(0 < c < N for c, _ in mine) / len(mine)
        table[name] = entry
    return table


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def scripted_file(tmp_path) -> str:
    lines = [{"prompt": f"Question number {i}?", "answer": str(i), "wins": wins, "greedy": greedy,
              **({"category": category} if category is not None else {})}
             for i, (category, wins, greedy) in enumerate(ROWS)]
    return write_rows(tmp_path / "mine.jsonl", lines)


@pytest.fixture()
def scripted(tmp_path) -> str:
    (tmp_path / "scripted.py").write_text(SCRIPTED, encoding="utf-8")
    return f"{tmp_path / 'scripted.py'}:scripted"


def test_eval_data_gives_the_headroom_table_by_hand(chatml_model_dir, tmp_path, scripted, monkeypatch):
    model_dir = shutil.copytree(chatml_model_dir, tmp_path / "model")  # eval-mine.json lands beside the model
    monkeypatch.setattr(cli, "console", Console(width=200))
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--data", scripted_file(tmp_path), "--reward", scripted,
                                      "--samples", str(N), "--k", "1", "--k", "2", "--k", "4",
                                      "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    written = json.loads((model_dir / "eval-mine.json").read_text())  # named by the file: no other evaluation's

    expected = expected_table((1, 2, 4))
    assert set(written["categories"]) == set(expected)
    for name, entry in expected.items():
        assert written["categories"][name] == pytest.approx(entry, abs=1e-12), name
    assert written["accuracy"] == expected["all"]["accuracy"] and written["problems"] == len(ROWS)
    assert written["pass@4"] == pytest.approx(expected["all"]["pass@4"])
    assert written["correct_if"] == "weighted total reward >= 1"  # no `correct` among the rewards
    # Per row, in the file's order: what a paired comparison of two models needs.
    assert written["per_problem"] == {"line": [1, 2, 3, 4, 5, 6], "category": [c for c, _, _ in ROWS],
                                      "greedy": [g for _, _, g in ROWS], "correct_samples": [c for _, c, _ in ROWS]}
    # The console table: one line per category, greedy / sampled / pass@k / 0<p<1.
    mul = next(line for line in result.output.splitlines() if "│ mul " in line)
    assert [cell.strip() for cell in mul.split("│")[1:-1]] == ["mul", "2", "0.5", "0.625", "0.625", "0.9167", "1",
                                                               "1"]

    # A threshold above every score: nothing is correct.
    strict = evaluate(model_dir, EvalOptions(data=scripted_file(tmp_path), rewards=(scripted,), samples=N,
                                             max_new_tokens=3, threshold=1.5), write=False)
    assert strict["accuracy"] == 0.0 and strict["categories"]["add"]["sampled_accuracy"] == 0.0


def test_a_run_reports_the_headroom_captured_per_category_of_its_heldout_file(tokenizer, tmp_path, scripted,
                                                                            monkeypatch):
    from posttrain.recipes.grpo import GRPOConfig, main

    model_dir = save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer, tmp_path / "lm")
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": f"Train {i}?", "answer": str(i)} for i in range(16)])
    cfg = load_config(GRPOConfig, find_recipe("grpo").path, [
        f"model.path={model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "train.save_every=0",
        "train.max_steps=1", "train.batch_size=8", "train.micro_batch_size=8", "sampling.samples_per_prompt=4",
        "sampling.max_new_tokens=4", f"data.source={train}", f"eval.source={scripted_file(tmp_path)}",
        "eval.samples=0", f"eval.headroom_samples={N}", f"reward.functions={{{scripted}: 1.0}}"])
    result = main(cfg)

    # The scripted reward ignores the model: before and after are the hand table, and nothing was captured.
    expected = expected_table((N,))
    summary = result.summary
    for key in ("heldout_headroom_before", "heldout_headroom"):
        assert set(summary[key]) == set(expected)
        for name, entry in expected.items():
            assert summary[key][name] == pytest.approx(entry, abs=1e-12), (key, name)
    assert summary["heldout_headroom_captured"]["mul"] == {"sampled_accuracy": 0.0, "accuracy": 0.0}
    report = (result.run_dir / "report.md").read_text()
    assert "## Headroom per category" in report
    assert "| after | mul | 2 | 50.0% | 62.5% | 100.0% | 100% | +0% | +0% |" in report
    assert json.loads((result.run_dir / "summary.json").read_text())["summary"]["heldout_headroom"] == summary[
        "heldout_headroom"]

    # posttrain eval <run> --data: the run's own reward functions score the file.
    again = evaluate(result.run_dir, EvalOptions(data=scripted_file(tmp_path), samples=N, pass_k=(N,),
                                                 max_new_tokens=4), write=False)
    assert again["rewards"] == {scripted: 1.0}
    for name, entry in expected.items():
        assert again["categories"][name] == pytest.approx(entry, abs=1e-12), name

    # A run that named its reward file relative to where it was started, evaluated from another directory.
    config = result.run_dir / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["reward"]["functions"] = {"scripted.py:scripted": 1.0}
    raw["run"]["workdir"] = str(tmp_path)
    config.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moved = evaluate(result.run_dir, EvalOptions(data=scripted_file(tmp_path), samples=N, pass_k=(N,),
                                                 max_new_tokens=4), write=False)
    assert moved["rewards"] == {"scripted.py:scripted": 1.0} and moved["categories"] == again["categories"]


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "verifiable_categories.jsonl"


def test_the_readme_commands_on_the_example_file(chatml_model_dir, tmp_path, monkeypatch):
    """README: `posttrain eval $M --data examples/verifiable_categories.jsonl --task arith`, and a GRPO run holding
    a quarter of the same file out, whose report has the headroom table before and after."""
    model_dir = shutil.copytree(chatml_model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(EXAMPLE), "--task", "arith",
                                      "--samples", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    written = json.loads((model_dir / f"eval-{EXAMPLE.stem}.json").read_text())
    sizes = {name: entry["problems"] for name, entry in written["categories"].items()}
    assert sizes == {"all": 24, "addition": 7, "multiplication": 8, "subtraction": 8}  # one row has no category
    assert written["correct_if"] == "reward correct >= 1" and written["per_problem"]["category"][-1] is None
    # README: a row's samples are the same at any --batch-size (the option it named did not exist)
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(EXAMPLE), "--task", "arith",
                                      "--samples", "2", "--max-new-tokens", "4", "--batch-size", "5",
                                      "--out", str(tmp_path / "by-5.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "by-5.json").read_text())["per_problem"] == written["per_problem"]

    result = CliRunner().invoke(app, ["grpo", "grpo", f"model.path={model_dir}", f"data.source={EXAMPLE}",
                                      "data.eval_split=0.25", "reward.task=arith", f"run.out_dir={tmp_path}",
                                      "run.name=g", "run.progress=false", "train.save_every=0", "train.max_steps=1",
                                      "train.batch_size=8", "train.micro_batch_size=8", "sampling.samples_per_prompt=4",
                                      "sampling.max_new_tokens=4", "eval.headroom_samples=2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())["summary"]
    assert summary["heldout_headroom"]["all"]["problems"] == 6 and "pass@2" in summary["heldout_headroom"]["all"]
    assert "## Headroom per category" in (tmp_path / "g" / "report.md").read_text()


def test_eval_of_models_a_user_brings(chatml_model_dir, tokenizer, tmp_path):
    """A base model without a chat template is evaluated with --template plain (the error's advice could not be
    followed: eval had no way to set it); a model beside an unrelated config.yaml is a model of its own (its
    Hydra-style settings were read as a run's and refused); a checkpoint's model/ is the checkpoint; a KL reference
    of another vocabulary is refused (a number was printed)."""
    from posttrain.errors import ConfigError
    from posttrain.eval.evaluate import resolve_target

    bare = tmp_path / "project" / "bare"
    shutil.copytree(chatml_model_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    (bare.parent / "config.yaml").write_text("defaults:\n  - model: big\n")  # a Hydra project's, beside the model
    assert resolve_target(bare).run_dir is None
    options = dict(problems=4, samples=2, pass_k=(1, 2), max_new_tokens=2)
    with pytest.raises(ConfigError, match="data.template: the tokenizer has no chat template"):
        evaluate(bare, EvalOptions(**options), write=False)
    result = evaluate(bare, EvalOptions(**options, data_settings={"template": "plain"}), write=False)
    assert result["problems"] == 4 and "pass@2" in result

    other = save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer), tokenizer, tmp_path / "other")
    with pytest.raises(ConfigError, match="--reference: .* has another tokenizer than the policy"):
        evaluate(chatml_model_dir, EvalOptions(**options, reference=str(other)), write=False)

    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    shutil.copytree(chatml_model_dir, checkpoint / "model")
    (checkpoint / "COMPLETE").write_text("")
    (checkpoint / "config.yaml").write_text("run:\n  name: run\n")  # a checkpoint keeps its run's settings
    assert resolve_target(checkpoint / "model").model_dir == checkpoint / "model"
    result = CliRunner().invoke(app, ["eval", str(bare), "--problems", "4", "--samples", "2", "--max-new-tokens", "2",
                                      "--template", "plain"], terminal_width=200)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["eval", str(bare), "--thinking", "maybe"], terminal_width=200)
    assert result.exit_code == 2 and "--thinking: 'maybe' is not one of on, off, fusion" in result.output


@pytest.mark.parametrize(("rows", "found"), [
    ({"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}, "preference rows (chosen, rejected)"),
    ({"prompt": "What is 1+1?", "completion": "2", "label": True}, "unpaired rows (prompt, completion, label)"),
    ({"prompt": "What is 1+1?", "completions": ["1+1=2"], "labels": [True]},
     "stepwise rows (prompt, completions, labels)"),
])
def test_eval_of_a_policy_on_a_file_of_comparisons_says_what_measures_them(chatml_model_dir, tmp_path, rows, found):
    """Its prompt column let such a file pass for prompt rows: with --reward the policy's own completions were scored
    (the chosen and rejected answers extra columns); without, the `correct` reward asked for a task."""
    from posttrain.errors import ConfigError

    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps(rows) + "\n")
    with pytest.raises(ConfigError, match=rf"--data: {data} holds {re.escape(found)}: --data scores a policy's own "
                                          "completions of prompt rows"):
        evaluate(chatml_model_dir, EvalOptions(data=str(data), problems=1, samples=0), write=False)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_eval_of_a_dpo_or_kto_run_on_a_file_equals_the_runs_own_held_out_evaluation(chatml_model_dir, tmp_path,
                                                                                   stage):
    """`posttrain eval <run> --data FILE` after the run measures what the run measured at its end with
    eval.source=FILE: the same loss and statistics, against the same reference (the model it started from)."""
    held = tmp_path / "held.jsonl"
    rows = ([{"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(6)]
            if stage == "dpo" else
            [{"prompt": f"What is {i}+{i}?", "completion": str(2 * i + i % 2), "label": i % 2 == 0} for i in range(6)])
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = EXAMPLE.parent / ("preference_implicit.jsonl" if stage == "dpo" else "unpaired.jsonl")
    result = CliRunner().invoke(app, [stage, stage, f"model.path={chatml_model_dir}", f"data.source={data}",
                                      f"eval.source={held}", f"run.out_dir={tmp_path}", "run.name=r",
                                      "run.progress=false", "train.save_every=0", "train.max_steps=2",
                                      "train.batch_size=4", "train.micro_batch_size=4", "optim.lr=1e-3",
                                      "optim.warmup_steps=0"], terminal_width=200)
    assert result.exit_code == 0, result.output
    logged = [m for m in read_metrics(tmp_path / "r" / "metrics.jsonl") if "eval_loss" in m][-1]
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "r"), "--data", str(held)], terminal_width=200)
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "r" / "eval-held.json").read_text())
    assert measured["kind"] == stage and measured["rows"] == 6 and measured["reference"] == str(chatml_model_dir)
    keys = [k for k in logged if k.startswith("eval_")]
    assert len(keys) >= 4 and {k: measured[k] for k in keys} == pytest.approx({k: logged[k] for k in keys}, abs=1e-5)
    assert logged["eval_loss"] != pytest.approx(math.log(2), abs=1e-3)  # trained away from the reference


def test_eval_of_a_data_file_measures_the_samples_kl_to_a_reference(chatml_model_dir, tmp_path, scripted):
    """--samples promised "pass@k, rewards and KL", and --reference was read, for a built-in task only: with --data
    no KL was measured. Against the model itself it is 0 (the same logprobs), against another model positive."""
    import torch
    from transformers import AutoModelForCausalLM

    other = shutil.copytree(chatml_model_dir, tmp_path / "other")  # its tokenizer, other weights
    model = AutoModelForCausalLM.from_pretrained(chatml_model_dir, local_files_only=True)
    generator = torch.Generator().manual_seed(0)  # a fixed other model: the sampled estimate is a fixed number
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(other)
    options = dict(data=scripted_file(tmp_path), rewards=(scripted,), samples=4, max_new_tokens=8)
    itself = evaluate(chatml_model_dir, EvalOptions(**options, reference=str(chatml_model_dir)), write=False)
    assert abs(itself["kl"]) < 1e-5
    assert evaluate(chatml_model_dir, EvalOptions(**options, reference=str(other)), write=False)["kl"] > 0.01
    assert "kl" not in evaluate(chatml_model_dir, EvalOptions(**options), write=False)  # a bare model: no reference
