"""Damaged checkpoints and metrics resume from the newest intact checkpoint; a diverging run keeps a checkpoint
from before its first skipped step.

A damaged run is the copy of an uninterrupted 6-step run (checkpoints at steps 2, 4, 6) stopped after step 4, with
one thing broken; resuming it must give that uninterrupted run's metrics and weights bitwise."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch
from test_engine import _flat_params, _loss_fn, _trainer, _untimed

from posttrain.errors import DataError, RunDirError
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.engine import TrainingError
from posttrain.train.metrics import read_metrics


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tokenizer):
    """The uninterrupted run: its directory and final weights."""
    out = tmp_path_factory.mktemp("faults")
    trainer, source = _trainer(out, tokenizer, name="full", steps=6, save_every=2, keep_last=3)
    trainer.fit(source, _loss_fn)
    return out, _flat_params(trainer.model)


def _stopped_copy(full_run):
    """The full run as if killed right after its step-4 checkpoint."""
    out, _ = full_run
    split = out / "split"
    shutil.rmtree(split, ignore_errors=True)
    shutil.copytree(out / "full", split)
    shutil.rmtree(split / "checkpoints" / "step-6")
    records = [r for r in read_metrics(split / "metrics.jsonl") if r["step"] <= 4]
    (split / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return split


def _resume(full_run, tokenizer):
    out, _ = full_run
    trainer, source = _trainer(out, tokenizer, name="split", steps=6, resume=True, save_every=2, keep_last=3)
    return trainer, trainer.fit(source, _loss_fn)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_step(path):  # same size, still valid JSON: only the checksum can tell
    path.write_text(path.read_text().replace('"step": 4', '"step": 5'))


DAMAGE = {
    "model/model.safetensors": _truncate,
    "optimizer-model.safetensors": lambda path: path.unlink(),
    "rng.safetensors": lambda path: path.unlink(),
    "state.json": _edit_step,
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_older_intact_one(full_run, tokenizer, capsys, name):
    split = _stopped_copy(full_run)
    DAMAGE[name](split / "checkpoints" / "step-4" / name)
    trainer, result = _resume(full_run, tokenizer)
    out = " ".join(capsys.readouterr().out.split())
    assert f"step-4 is damaged: {name}" in out and "resuming from step-2" in out and "resumed from" in out
    assert (split / "checkpoints" / "damaged-step-4" / "state.json").is_file()  # kept aside, not deleted
    assert result.step == 6
    assert _untimed(read_metrics(split / "metrics.jsonl")) == _untimed(read_metrics(full_run[0] / "full" /
                                                                                   "metrics.jsonl"))
    assert torch.equal(_flat_params(trainer.model), full_run[1])


def test_no_intact_checkpoint_is_a_one_line_error(full_run, tokenizer):
    split = _stopped_copy(full_run)
    shutil.rmtree(split / "checkpoints" / "step-2")
    (split / "checkpoints" / "step-4" / "rng.safetensors").unlink()
    with pytest.raises(RunDirError, match="no intact checkpoint to resume from") as err:
        _resume(full_run, tokenizer)
    assert "step-4: rng.safetensors is missing" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["step-4"]  # nothing moved


def test_a_partial_last_metrics_line_is_dropped_on_resume(full_run, tokenizer):
    split = _stopped_copy(full_run)
    with (split / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 6.2')  # a crash in the middle of writing step 5's record
    trainer, result = _resume(full_run, tokenizer)
    assert _untimed(read_metrics(split / "metrics.jsonl")) == _untimed(read_metrics(full_run[0] / "full" /
                                                                                   "metrics.jsonl"))
    assert torch.equal(_flat_params(trainer.model), full_run[1])


def test_read_metrics_drops_only_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match="metrics.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_a_spike_is_skipped_and_a_checkpoint_from_before_it_is_kept(tmp_path, tokenizer, capsys):
    """The learning rate jumps to 10 at step 5 (as a far too large lr does once warm-up ends): step 5's update
    blows the weights up, step 6's gradient norm spikes and is skipped, and so are 7 and 8, which stops the run.
    keep_last=1 would leave only step-6, whose weights are the diverged ones; step-4 must stay."""
    trainer, source = _trainer(tmp_path, tokenizer, steps=12, save_every=2, keep_last=1, max_nonfinite=3,
                               spike_factor=10, spike_warmup=3, max_weight_growth=0)  # the spike guard alone
    snapshots = {}

    def loss_fn(model, batch, normaliser):
        step = trainer.step + 1
        snapshots.setdefault(step, _flat_params(model).clone())
        if step == 5:
            trainer.scheduler.base_lrs = [10.0] * len(trainer.scheduler.base_lrs)
            for group in trainer.optimizer.param_groups:
                group["lr"] = 10.0
        return _loss_fn(model, batch, normaliser)

    with pytest.raises(TrainingError, match="3 consecutive steps .* the first skipped step was 6"):
        trainer.fit(source, loss_fn)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("spike")] == [6, 7]  # step 8 stops the run before it is logged
    said = " ".join(capsys.readouterr().out.split())  # each skip said as it happens, with its numbers
    norm, median = records[5]["grad_norm"], statistics.median(r["grad_norm"] for r in records[2:5])
    assert (f"test: step 6 skipped: its gradient norm {norm:.3g} is {norm / median:.1f} x the median of the last 3 "
            "trained steps' (train.spike_factor=10); its batch is left untrained") in said
    assert trainer.skipped_steps == 3 and not any(r.get("nonfinite") for r in records)
    assert snapshots[6].abs().max() > 10 * snapshots[5].abs().max()  # step 5 diverged ...
    assert torch.equal(_flat_params(trainer.model), snapshots[6])  # ... and 6-8 left the weights untouched
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-4", "step-6"]
    resumed, source = _trainer(tmp_path, tokenizer, name="probe", steps=1)
    from posttrain.train.checkpoint import load_module_weights

    load_module_weights(resumed.model, root / "step-4" / "model")
    assert torch.equal(_flat_params(resumed.model), snapshots[5])  # the weights before the diverging update


def test_the_spike_guard_waits_for_its_window_and_ignores_normal_steps(tmp_path, tokenizer):
    trainer, source = _trainer(tmp_path, tokenizer, steps=6, save_every=0, spike_factor=10, spike_warmup=3)
    seen = []

    def loss_fn(model, batch, normaliser):
        seen.append(len(trainer._grad_norms))
        return _loss_fn(model, batch, normaliser)

    result = trainer.fit(source, loss_fn)
    assert result.skipped_steps == 0 and seen[-1] == 3  # the window holds the last 3 trained steps


def _lr_jumps_to(trainer, lr, at_step, snapshots):
    """A loss function that records the weights each step starts from and sets the learning rate to `lr` from
    step `at_step` on (a typo'd lr, or one far too large once warm-up ends)."""
    def loss_fn(model, batch, normaliser):
        step = trainer.step + 1
        snapshots.setdefault(step, _flat_params(model).clone())
        if step == at_step:
            trainer.scheduler.base_lrs = [lr] * len(trainer.scheduler.base_lrs)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
        return _loss_fn(model, batch, normaliser)
    return loss_fn


def test_an_update_that_blows_the_weights_up_stops_the_run_before_it_is_saved(tmp_path, tokenizer):
    """Issue 22, problem 7: a huge learning rate makes a finite step that blows the weights up; with a checkpoint
    every step and keep_last=1, the run must stop at that step and keep the checkpoint from before it."""
    trainer, source = _trainer(tmp_path, tokenizer, steps=8, save_every=1, keep_last=1)
    snapshots = {}
    with pytest.raises(TrainingError, match=r"step 4 multiplied the norm of the trainable weights by .*"
                                            r"the newest checkpoint, .*step-3, holds the weights from before it"):
        trainer.fit(source, _lr_jumps_to(trainer, 1e3, 4, snapshots))
    assert _flat_params(trainer.model).abs().max() > 100  # the update did blow up (Adam moves each weight ~lr)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-3"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    probe, _ = _trainer(tmp_path, tokenizer, name="probe", steps=1)
    from posttrain.train.checkpoint import load_module_weights

    load_module_weights(probe.model, root / "step-3" / "model")
    assert torch.equal(_flat_params(probe.model), snapshots[4])  # the weights before the diverging update


def test_a_first_step_that_blows_the_weights_up_leaves_no_checkpoint(tmp_path, tokenizer):
    """The first step has no spike window and its loss and gradient are finite: only the weights show it."""
    trainer, source = _trainer(tmp_path, tokenizer, steps=4, save_every=1)
    with pytest.raises(TrainingError, match="step 1 multiplied .* no checkpoint was written yet: the starting "
                                            "model is unchanged on disk") as err:
        trainer.fit(source, _lr_jumps_to(trainer, 1e6, 1, {}))
    assert "\n" not in str(err.value) and "optim.lr" in str(err.value)
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_healthy_steps_and_a_zero_weight_start_pass_the_weight_growth_guard(tmp_path, tokenizer):
    """The guard's reference: the trainable weights' global norm, measured by hand. A normal lr moves it by far
    less than the limit; weights that start at zero (nothing to compare with) are not judged."""
    trainer, source = _trainer(tmp_path, tokenizer, steps=3, save_every=0)
    result = trainer.fit(source, _loss_fn)
    norm = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in trainer.model.parameters()
                                               if p.requires_grad]).double())
    assert result.step == 3 and result.last["weight_norm"] == pytest.approx(norm.item(), rel=1e-6)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    growth = [b["weight_norm"] / a["weight_norm"] for a, b in zip(records, records[1:], strict=False)]
    assert all(0.9 < g < 1.1 for g in growth)
    zero, source = _trainer(tmp_path, tokenizer, name="zero", steps=2, save_every=0)
    with torch.no_grad():
        for p in zero.model.parameters():
            p.zero_()
    assert zero.fit(source, _loss_fn).step == 2


def test_steps_with_nothing_to_learn_stay_out_of_the_spike_window(tmp_path, tokenizer):
    """Steps 4-5 have a zero gradient (as an RL step whose groups all tie); step 6's is 1000 times a normal one.
    With the zeros in the window its median would be 0 and the guard blind; without them it skips step 6."""
    trainer, source = _trainer(tmp_path, tokenizer, steps=6, save_every=0, spike_warmup=3)
    scale = {4: 0.0, 5: 0.0, 6: 1000.0}

    def loss_fn(model, batch, normaliser):
        loss, metrics = _loss_fn(model, batch, normaliser)
        return loss * scale.get(trainer.step + 1, 1.0), metrics

    result = trainer.fit(source, loss_fn)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["grad_norm"] == 0 for r in records] == [False, False, False, True, True, False]
    assert [r["step"] for r in records if r.get("spike")] == [6] and result.skipped_steps == 1
    assert len(trainer._grad_norms) == 3 and 0 not in trainer._grad_norms


def test_a_checkpoint_and_a_model_with_and_without_an_adapter_do_not_load_into_each_other(tmp_path, tokenizer):
    """Resuming a LoRA run as a full fine-tune (or the other way round) is a one-line error naming the setting, not
    an AttributeError deep in peft."""
    from posttrain.config import ModelConfig
    from posttrain.models import build_model, save_pretrained
    from posttrain.models.adapters import AdapterConfig, apply_adapter
    from posttrain.train.checkpoint import load_module_weights

    plain = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    save_pretrained(plain, tokenizer, tmp_path / "full")
    lora = apply_adapter(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), AdapterConfig(method="lora", r=2))
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for module, directory in ((plain, "adapter"), (lora, "full")):
        with pytest.raises(ValueError, match=r"adapter settings \(adapter.method\)"):
            load_module_weights(module, tmp_path / directory)
    load_module_weights(lora, tmp_path / "adapter")
    load_module_weights(plain, tmp_path / "full")


def test_a_resume_says_which_steps_metrics_jsonl_lost(full_run, tokenizer, capsys):
    """Records lost (the file's tail after a power cut: metrics are flushed, not synced, while checkpoints are) left
    a hole in the run's curves that nothing mentioned."""
    split = _stopped_copy(full_run)
    records = [r for r in read_metrics(split / "metrics.jsonl") if r["step"] not in (2, 3, 4)]
    (split / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, result = _resume(full_run, tokenizer)
    out = " ".join(capsys.readouterr().out.split())
    assert "metrics.jsonl has no record of 3 of the 4 steps trained before this resume (steps 2-4)" in out, out
    assert result.step == 6 and [r["step"] for r in read_metrics(split / "metrics.jsonl")] == [1, 5, 6]
