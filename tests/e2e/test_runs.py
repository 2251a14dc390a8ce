"""Runs that cannot be lost or corrupted: `resume` works on the directory it is given, refuses what it cannot
continue without touching a byte, never retrains from step 0; `run.overwrite` keeps the old run until the new
one trains; SIGTERM before the training loop exits with a message and leaves nothing half-made."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.config import RunConfig
from posttrain.errors import ConfigError, RunDirError
from posttrain.train.metrics import read_metrics, truncate_metrics, truncate_samples
from posttrain.train.run_dir import check_run_dir, prepare_run_dir, run_lock_file

runner = CliRunner()


def _sft_args(model: Path, out: Path, name: str = "sft", steps: int = 2) -> list[str]:
    return ["sft", f"model.path={model}", f"run.out_dir={out}", f"run.name={name}", "run.progress=false",
            "data.size=16", f"train.max_steps={steps}", "train.batch_size=8", "train.micro_batch_size=8",
            "train.save_every=1", "eval.problems=4", "eval.samples=0", "eval_before=false"]


def _files(path: Path) -> dict[str, str]:
    """Every file under `path` with its content hash: equal means byte-identical."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _invoke(args: list[str]) -> tuple[int, str]:
    """The CLI's exit code and its output with line wrapping undone."""
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture(scope="module")
def finished_sft(pretrained_run, tmp_path_factory):
    """A finished 2-step SFT run (checkpoints at steps 1 and 2); tests copy it, never change it."""
    out = tmp_path_factory.mktemp("finished")
    code, output = _invoke(_sft_args(pretrained_run.final_dir, out))
    assert code == 0, output
    return out / "sft"


def test_resume_continues_the_copy_it_is_given_from_any_cwd(finished_sft, tmp_path, monkeypatch):
    original = _files(finished_sft)
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(finished_sft, copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the saved out_dir means nothing from here; the directory is the run
    code, output = _invoke(["resume", os.path.relpath(copy, elsewhere), "train.max_steps=4"])
    assert code == 0, output
    assert "resumed from" in output and "step-2" in output
    assert [m["step"] for m in read_metrics(copy / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (copy / "checkpoints" / "step-4" / "COMPLETE").is_file()
    assert '"steps": 4' in (copy / "summary.json").read_text()
    assert _files(finished_sft) == original
    assert not list(elsewhere.iterdir())


def test_resume_reads_relative_paths_where_the_run_was_started(pretrained_run, tmp_path, monkeypatch):
    """model.path and run.out_dir given relative to the directory the run started in still mean the same files
    when it is resumed from anywhere else; a run copied where that directory does not exist reads them from the
    current one, and says so."""
    project = tmp_path / "project"
    shutil.copytree(pretrained_run.final_dir, project / "base")
    monkeypatch.chdir(project)
    code, output = _invoke(_sft_args(Path("base"), Path("runs")))
    assert code == 0, output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, output = _invoke(["resume", "../project/runs/sft", "train.max_steps=3"])
    assert code == 0, output
    assert f"resolve against {project}, where it was started" in output
    assert [m["step"] for m in read_metrics(project / "runs" / "sft" / "metrics.jsonl")] == [1, 2, 3]
    assert "workdir: " + str(project) in (project / "runs" / "sft" / "config.yaml").read_text()

    machine = tmp_path / "other-machine"  # the run and its base model copied side by side, the project gone
    shutil.copytree(project, machine)
    shutil.rmtree(project)
    monkeypatch.chdir(machine)
    code, output = _invoke(["resume", "runs/sft", "train.max_steps=4"])
    assert code == 0, output
    assert f"was started in {project}, which does not exist here" in output
    assert [m["step"] for m in read_metrics(machine / "runs" / "sft" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "workdir: " + str(machine) in (machine / "runs" / "sft" / "config.yaml").read_text()


def test_resume_names_of_the_run_cannot_be_overridden(finished_sft):
    code, output = _invoke(["resume", str(finished_sft), "run.name=other"])
    assert code == 2 and "run.name" in output


# The last two: settings the checkpoint does not fit, found as it loads; the run's config.yaml (rewritten with them
# by then) is put back, so that a plain `posttrain resume` of the directory still works.
@pytest.mark.parametrize("broken", ["finished", "no_checkpoints", "max_steps_below_checkpoint", "other_data",
                                    "other_adapter"])
def test_resume_refuses_what_it_cannot_continue_and_changes_nothing(finished_sft, tmp_path, broken):
    copy = tmp_path / "copy"
    shutil.copytree(finished_sft, copy)
    overrides = []
    if broken == "no_checkpoints":
        shutil.rmtree(copy / "checkpoints")
        overrides = ["train.max_steps=4"]  # even with steps left, never from step 0 over its own results
    elif broken != "finished":
        (copy / "summary.json").unlink()  # an interrupted run: no summary yet
        overrides = {"max_steps_below_checkpoint": ["train.max_steps=1"], "other_data": ["data.size=8"],
                     "other_adapter": ["adapter.method=lora"]}[broken]
    before = _files(copy)
    code, output = _invoke(["resume", str(copy), *overrides])
    assert code == 2, output
    message = {"finished": "has finished its 2 steps", "no_checkpoints": "no complete checkpoint",
               "max_steps_below_checkpoint": "past train.max_steps=1",
               "other_data": "trains on the data it started with",
               "other_adapter": "was trained with adapter.method=none and this run has adapter.method=lora"}[broken]
    assert message in output, output
    assert _files(copy) == before


def test_overwrite_with_a_bad_batch_size_keeps_the_old_run(finished_sft, tmp_path):
    copy = tmp_path / "sft"
    shutil.copytree(finished_sft, copy)
    before = _files(copy)
    args = _sft_args(Path("unused"), tmp_path) + ["run.overwrite=true", "train.batch_size=10",
                                                   "train.micro_batch_size=4"]
    code, output = _invoke(args)
    assert code == 2 and "batch_size 10 is not a multiple of micro_batch_size 4" in output
    assert _files(copy) == before


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_a_run_name_that_is_not_one_directory_is_refused(finished_sft, tmp_path, name):
    """An empty run.name (an unset shell variable) made out_dir itself the run directory: with run.overwrite=true
    every other run in it was deleted."""
    out = tmp_path / "runs"
    shutil.copytree(finished_sft, out / "precious")
    (out / "notes.txt").write_text("keep me")
    before = _files(tmp_path)
    code, output = _invoke(_sft_args(Path("unused"), out, name=name) + ["run.overwrite=true"])
    assert code == 2 and "run.name" in output and "is not a run name" in output, output
    assert _files(tmp_path) == before


def test_overwrite_replaces_runs_only(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "thesis.tex").write_text("years of work")
    code, output = _invoke(_sft_args(Path("unused"), tmp_path) + ["run.overwrite=true"])
    assert code == 2 and "is not a run directory (no config.yaml)" in output, output
    assert (tmp_path / "sft" / "thesis.tex").read_text() == "years of work"


def test_overwrite_failing_before_training_restores_the_old_run(finished_sft, pretrained_run, tmp_path,
                                                                  monkeypatch):
    copy = tmp_path / "sft"
    shutil.copytree(finished_sft, copy)
    before = _files(copy)

    def fail(*args, **kwargs):
        raise ConfigError("a failure after the run directory was prepared", field="test")

    monkeypatch.setattr("posttrain.recipes.sft.Trainer", fail)
    code, output = _invoke(_sft_args(pretrained_run.final_dir, tmp_path) + ["run.overwrite=true"])
    assert code == 2 and "a failure after the run directory" in output
    assert _files(copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # nothing left aside


def test_overwrite_deletes_the_old_run_once_the_new_one_trains(finished_sft, pretrained_run, tmp_path):
    copy = tmp_path / "sft"
    shutil.copytree(finished_sft, copy)
    (copy / "old-only.txt").write_text("from the old run")
    code, output = _invoke(_sft_args(pretrained_run.final_dir, tmp_path, steps=1) + ["run.overwrite=true"])
    assert code == 0, output
    assert not (copy / "old-only.txt").exists() and not (copy / ".unstarted").exists()
    assert [m["step"] for m in read_metrics(copy / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


@dataclasses.dataclass(frozen=True)
class _RunOnly:
    run: RunConfig


@pytest.mark.parametrize("killed_after", ["move_aside", "restore"])
def test_a_kill_before_the_first_step_is_undone_by_the_next_start(tmp_path, killed_after):
    """SIGKILL leaves the new directory marked unstarted with the old run aside; the next start puts the old
    run back, whether it was killed after moving the old run aside or halfway through putting it back."""
    old = tmp_path / "run"
    old.mkdir()
    (old / "config.yaml").write_text("stage: test\n")
    (old / "metrics.jsonl").write_text('{"step": 1}\n')
    run = RunConfig(name="run", out_dir=str(tmp_path), overwrite=True)
    cfg = _RunOnly(run)
    prepare_run_dir(run, cfg, stage="test")  # the process dies here, before a step is trained
    assert (old / ".unstarted").is_file() and not (old / "metrics.jsonl").exists()
    if killed_after == "restore":  # the new directory was already renamed away, the old not yet back
        os.replace(old, tmp_path / ".run.abandoned")
    with pytest.raises(RunDirError, match="already exists"):  # a retry without overwrite: the old run is back
        check_run_dir(RunConfig(name="run", out_dir=str(tmp_path)), cfg)
    assert (old / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_truncating_metrics_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    kept = truncate_metrics(path, 2)
    assert kept == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert read_metrics(path) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]



def test_truncating_samples_keeps_each_steps_samples_once(tmp_path):
    """A resumed process evaluates the starting model again (step 0, appended after the first process's later
    steps) and samples again from its checkpoint's step: both copies go."""
    path = tmp_path / "samples.jsonl"
    first = [{"step": 0, "c": "a"}, {"step": 0, "c": "b"}, {"step": 1, "c": "c"}, {"step": 2, "c": "d"},
             {"step": 3, "c": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*first, {"step": 0, "c": "a"}, {"step": 0, "c": "b"}]))
    truncate_samples(path, 2)
    assert read_metrics(path) == first[:4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


SLOW_PHASE = """
import sys, time
{target}
real = target.{name}
def slow(*args, **kwargs):
    print("IN-PHASE", flush=True)
    time.sleep(120)
    return real(*args, **kwargs)
target.{name} = slow
from posttrain.cli import app
app(sys.argv[1:], prog_name="posttrain")
"""


@pytest.mark.parametrize("phase", ["data_preparation", "eval_before_of_an_overwrite"])
def test_sigterm_before_the_training_loop_exits_cleanly(pretrained_run, finished_sft, tmp_path, phase):
    if phase == "data_preparation":
        target, name, extra = "import posttrain.recipes.sft as target", "prepare_data", []
    else:  # the old run is moved aside by then, and must come back
        shutil.copytree(finished_sft, tmp_path / "sft")
        target, name = "from posttrain.eval.heldout import Evaluation as target", "run"
        extra = ["run.overwrite=true", "eval_before=true"]
    before, names = _files(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    script = tmp_path.parent / f"{tmp_path.name}-slow.py"
    script.write_text(SLOW_PHASE.format(target=target, name=name))
    proc = subprocess.Popen([sys.executable, str(script), *_sft_args(pretrained_run.final_dir, tmp_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    try:
        output = []
        for line in iter(proc.stdout.readline, ""):
            output.append(line)
            if line.strip() == "IN-PHASE":
                proc.send_signal(signal.SIGTERM)
                break
        output.append(proc.communicate(timeout=60)[0])
    finally:
        proc.kill()
    text = "".join(output)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text
    # Nothing new was left (no directory that blocks the retry), and an overwritten run is back, byte for byte.
    assert sorted(p.name for p in tmp_path.iterdir()) == names and _files(tmp_path) == before


def test_a_run_another_process_is_running_is_refused(finished_sft, tmp_path):
    """A second process on one run directory (a resume of a run still running, an overwrite under it) is refused
    before it touches anything, while the first holds the run's lock; once that one ends, the run resumes."""
    import subprocess
    import sys

    copy = tmp_path / "sft"
    shutil.copytree(finished_sft, copy)
    (copy / "summary.json").unlink()
    run_lock_file(copy).parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True);"
        " time.sleep(60)"), str(run_lock_file(copy))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(copy)
        code, output = _invoke(["resume", str(copy), "train.max_steps=3"])
        assert code == 2 and "another process is running this run now" in output, output
        assert _files(copy) == before
    finally:
        holder.kill()
        holder.wait()
    code, output = _invoke(["resume", str(copy), "train.max_steps=3"])
    assert code == 0, output


def test_a_start_stopped_by_its_rewards_keeps_their_errors(chatml_model_dir, tmp_path):
    """A reward function broken on every row stops the run in its first round, before a step: the run directory is
    undone, and the grader_errors.jsonl its error message pointed to went with it. It is kept beside the run, where
    a second start is not refused for it."""
    from posttrain.rewards.functions import REWARD_FUNCTIONS, register_reward_function

    if "test_broken_everywhere" not in REWARD_FUNCTIONS:
        @register_reward_function("test_broken_everywhere")
        def _broken(batch):
            raise ValueError("boom")

    example = Path(__file__).parents[2] / "examples" / "prompt_only.jsonl"
    args = ["grpo", "grpo", f"model.path={chatml_model_dir}", f"data.source={example}", f"run.out_dir={tmp_path}",
            "run.name=broken", "run.progress=false", "train.max_steps=1", "train.batch_size=8",
            "train.micro_batch_size=8", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=4",
            "eval_before=false", "reward.functions={test_broken_everywhere: 1.0}"]
    for _ in range(2):  # the second start is not refused for the kept file
        result = CliRunner().invoke(app, args, terminal_width=300)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "8 of 8 scores of this batch are errors" in output, result.output
        assert not (tmp_path / "broken").exists()
        kept = tmp_path / "broken.grader_errors.jsonl"
        assert f"its reward errors, now in {kept}" in output
        assert output.endswith(f"(all in {kept})")  # the error's own line: where the file is, not where it was
        records = [json.loads(line) for line in kept.read_text().splitlines()]
        assert len(records) == 8 and all("ValueError: boom" in r["error"] for r in records)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_is_refused_at_the_start(tmp_path, monkeypatch, tracker):
    """It was refused when the trackers were built, after the model, the data and a first held-out evaluation (500
    problems of the full sft recipe)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == tracker
                        else find_spec(name, *args))
    run = RunConfig(name="run", out_dir=str(tmp_path), **{tracker: True})
    with pytest.raises(ConfigError, match=f"run.{tracker}: {tracker} is not installed"):
        check_run_dir(run, _RunOnly(run))
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_refuses_the_report_is_one_line_and_resume_writes_it(pretrained_run, finished_sft, tmp_path,
                                                                          monkeypatch):
    """A full disk once training is done (the report's plot here): the run ended with the storage's traceback, and
    its summary.json, written first, marked it finished without a report. Now one line with what to do, and the
    summary is written last: the run resumes from its last step's checkpoint and writes what is missing."""
    import errno

    from posttrain.eval import report

    def full_disk(metrics, path, title):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "plot_curves", full_disk)
    code, output = _invoke(_sft_args(pretrained_run.final_dir, tmp_path))
    run = tmp_path / "sft"
    assert code == 2, output
    assert f"error: {run / 'plots' / 'curves.png'}: No space left on device; resume with: posttrain resume {run}" \
        in output, output
    assert not (run / "summary.json").exists()
    monkeypatch.undo()
    code, output = _invoke(["resume", str(run)])
    assert code == 0, output
    assert (run / "report.md").is_file() and (run / "plots" / "curves.png").is_file()
    assert '"steps": 2' in (run / "summary.json").read_text()
    assert _files(run / "final") == _files(finished_sft / "final")


def test_a_run_directory_that_cannot_be_written_is_refused_before_loading(pretrained_run, tmp_path):
    """Refused by writing a file there, before the model and data are loaded (the first write came after them);
    a path under a regular file stands in for a read-only disk, which root's tests cannot make."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = _invoke(_sft_args(pretrained_run.final_dir, blocker / "runs"))
    assert code == 2 and f"error: {blocker}: cannot write here (Not a directory): choose a writable run.out_dir" \
        in output, output
    code, output = _invoke(["eval", str(pretrained_run.final_dir), "--problems", "2", "--samples", "0",
                            "--out", str(blocker / "eval.json")])
    assert code == 2 and "cannot write here (Not a directory): name a writable file with --out" in output, output
    code, output = _invoke(["eval", str(pretrained_run.final_dir), "--problems", "2", "--samples", "0",
                            "--out", str(tmp_path / "new" / "eval.json")])  # a directory not there yet is made
    assert code == 0 and (tmp_path / "new" / "eval.json").is_file(), output


def test_a_run_whose_model_moved_resumes_from_its_new_place_and_not_from_another_model(pretrained_run,
                                                                                      finished_sft, tmp_path):
    """model.path was compared as text: a run whose starting model had moved (or was named by another path) could not
    be resumed at all, with or without model.path=<its new place>. Now the checkpoint keeps the model's files'
    fingerprint: the same files anywhere resume, other files under any path are refused."""
    shutil.copytree(pretrained_run.final_dir, tmp_path / "base")
    code, output = _invoke(_sft_args(tmp_path / "base", tmp_path / "runs"))
    assert code == 0, output
    run = tmp_path / "runs" / "sft"
    shutil.move(tmp_path / "base", tmp_path / "moved")
    code, output = _invoke(["resume", str(run), "train.max_steps=3"])
    assert code == 2 and (f"model.path: {tmp_path / 'base'}, the model the run started from, is not there (moved or "
                          "deleted?): resume with model.path=<where it is now>") in output, output
    code, output = _invoke(["resume", str(run), "train.max_steps=3", f"model.path={tmp_path / 'moved'}"])
    assert code == 0, output
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    # Another model where it is now (the SFT model's weights, same shapes): refused, naming the file that differs.
    shutil.copy(finished_sft / "final" / "model.safetensors", tmp_path / "moved" / "model.safetensors")
    code, output = _invoke(["resume", str(run), "train.max_steps=4"])
    assert code == 2 and (f"{tmp_path / 'moved'} is not the model the checkpoint step-3 was trained with at "
                          f"model.path ({tmp_path / 'moved'} then): model.safetensors differ") in output, output


def test_a_dpo_run_resumes_against_its_own_reference_model_and_no_other(pretrained_run, finished_sft, tmp_path):
    """reference.path was not checked on resume: another model under it (retrained in place), or named by an
    override, became the reference of the remaining steps without a word (the precomputed logprobs were computed
    again from it). It is compared by its files now, as model.path is; a moved reference resumes from its new place."""
    shutil.copytree(pretrained_run.final_dir, tmp_path / "ref")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i)}) + "\n"
                             for i in range(8)))
    args = ["dpo", f"model.path={finished_sft / 'final'}", f"reference.path={tmp_path / 'ref'}",
            f"data.source={pairs}", f"run.out_dir={tmp_path / 'runs'}", "run.name=dpo", "run.progress=false",
            "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4", "train.save_every=1",
            "eval.problems=0", "eval_before=false"]
    code, output = _invoke(args)
    assert code == 0, output
    run = tmp_path / "runs" / "dpo"
    shutil.copy(finished_sft / "final" / "model.safetensors", tmp_path / "ref" / "model.safetensors")
    code, output = _invoke(["resume", str(run), "train.max_steps=3"])
    assert code == 2 and (f"reference.path: {tmp_path / 'ref'} is not the model the checkpoint step-2 was trained "
                          f"with at reference.path ({tmp_path / 'ref'} then): model.safetensors differ") \
        in output, output
    code, output = _invoke(["resume", str(run), "train.max_steps=3", "reference.path=null"])
    assert code == 2 and (f"the checkpoint step-2 was trained with reference.path={tmp_path / 'ref'} and this run "
                          "has reference.path=None") in output, output
    shutil.copytree(pretrained_run.final_dir, tmp_path / "ref-moved")
    code, output = _invoke(["resume", str(run), "train.max_steps=3", f"reference.path={tmp_path / 'ref-moved'}"])
    assert code == 0, output
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_resuming_a_run_stopped_before_its_first_step_says_so(tmp_path):
    """The resume undid the unstarted run, then said there was no run here (no config.yaml): it had been there a
    moment before."""
    run = RunConfig(name="run", out_dir=str(tmp_path))
    prepare_run_dir(run, _RunOnly(run), stage="test")  # the process dies here, before a step is trained
    resumed = RunConfig(name="run", out_dir=str(tmp_path), resume=True)
    with pytest.raises(RunDirError, match="had been stopped before its first step, so there is nothing to resume: "
                                          "nothing of the run was kept; start it again"):
        check_run_dir(resumed, _RunOnly(resumed))
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_its_config_yaml_is_told_where_a_copy_is(finished_sft, tmp_path):
    copy = tmp_path / "sft"
    shutil.copytree(finished_sft, copy)
    (copy / "config.yaml").unlink()
    code, output = _invoke(["resume", str(copy), "train.max_steps=3"])
    assert code == 2 and (f"not a run directory (no config.yaml); its last checkpoint keeps the config it was "
                          f"trained with: copy {copy / 'checkpoints' / 'step-2' / 'config.yaml'} to "
                          f"{copy / 'config.yaml'} to resume") in output, output
    shutil.copy(copy / "checkpoints" / "step-2" / "config.yaml", copy / "config.yaml")
    code, output = _invoke(["resume", str(copy), "train.max_steps=3"])
    assert code == 0, output


def test_report_of_a_run_stopped_before_its_end_draws_what_it_logged_and_leaves_it_resumable(finished_sft, tmp_path):
    """`posttrain report` refused a run without summary.json (one stopped by non-finite losses, interrupted or
    killed): "not a finished run". It draws the logged steps now, says the run is unfinished, and writes no
    summary.json (which would mark the run finished: the resume below would refuse to train on)."""
    run = tmp_path / "sft"
    shutil.copytree(finished_sft, run)
    (run / "summary.json").unlink()
    (run / "report.md").unlink()
    (run / "plots" / "curves.png").unlink()
    code, output = _invoke(["report", str(run)])
    assert code == 0, output
    report = (run / "report.md").read_text()
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert report.startswith("# sft sft: unfinished, last logged step 2\n")
    assert f"| loss | {last['loss']:.4g} |" in report and (run / "plots" / "curves.png").is_file()
    assert not (run / "summary.json").exists()
    code, output = _invoke(["resume", str(run), "train.max_steps=3"])
    assert code == 0 and (run / "summary.json").is_file(), output


def test_saved_weights_are_as_readable_as_the_runs_other_files(finished_sft):
    """safetensors writes its files 0600: final/model.safetensors and a checkpoint's optimizer and RNG states were
    readable by their owner alone, beside 0644 files (a model saved for a team that others could not load)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    weights = sorted(finished_sft.rglob("*.safetensors"))
    assert any(p.parent.name == "final" for p in weights) and any(p.name == "rng.safetensors" for p in weights)
    assert {str(p.relative_to(finished_sft)): oct(p.stat().st_mode & 0o777) for p in weights} == {
        str(p.relative_to(finished_sft)): oct(expected) for p in weights}
    assert (finished_sft / "final" / "config.json").stat().st_mode & 0o777 == expected  # as the other files are
