"""The shared training loop: accumulation invariance, exact resume, signals, crash safety, NaN guard."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from posttrain.config import ModelConfig, OptimConfig, RunConfig
from posttrain.errors import ConfigError, DataError
from posttrain.models import build_model
from posttrain.train.checkpoint import latest_checkpoint, list_checkpoints, load_module_weights
from posttrain.train.engine import TrainConfig, Trainer, TrainingError
from posttrain.train.metrics import read_metrics
from posttrain.train.optim import lr_factor
from posttrain.train.run_dir import prepare_run_dir
from posttrain.train.signals import StoppedInTraining
from posttrain.train.sources import ShuffledStepSource

SEQ = 12
TIMING_KEYS = {"step_time_s", "elapsed_s", "tokens_per_s", "evaluation_s"}


@dataclasses.dataclass(frozen=True)
class EngineTestConfig:
    run: RunConfig
    train: TrainConfig
    optim: OptimConfig


def _data(tokenizer, n: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randint(3, len(tokenizer), (n, SEQ), generator=generator)


def _loss_fn(model, batch, normaliser):
    # HF's loss is a mean over this micro-batch's predicted tokens; turn it into a sum over the global count.
    predicted = batch.shape[0] * (SEQ - 1)
    loss = model(input_ids=batch, labels=batch).loss * predicted / normaliser
    return loss, {"loss": loss.item()}


def _trainer(tmp_path, tokenizer, *, name="run", steps=6, batch=8, micro=4, resume=False, seed=0, schedule_steps=0,
             lr=3e-3, **train_kw):
    cfg = EngineTestConfig(
        run=RunConfig(name=name, out_dir=str(tmp_path), progress=False, resume=resume, seed=seed),
        train=TrainConfig(max_steps=steps, batch_size=batch, micro_batch_size=micro, **train_kw),
        optim=OptimConfig(lr=lr, warmup_steps=2, schedule="cosine", schedule_steps=schedule_steps),
    )
    torch.manual_seed(seed)
    run_dir = prepare_run_dir(cfg.run, cfg, stage="test")
    # A resumed model starts from different weights on purpose: the checkpoint must replace them all.
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=seed + (99 if resume else 0))
    trainer = Trainer(stage="test", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                      model=model)
    data = _data(tokenizer)
    source = ShuffledStepSource(len(data), batch, micro, seed, collate=lambda idx: data[idx],
                                count=lambda idx: (len(idx) * (SEQ - 1), len(idx) * SEQ))
    return trainer, source


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("micro", [1, 4])
def test_accumulation_gives_the_full_batch_gradient(tmp_path, tokenizer, micro):
    grads = {}
    for m in (16, micro):
        trainer, source = _trainer(tmp_path, tokenizer, name=f"acc{m}", steps=1, batch=16, micro=m)

        def capture(optimizer, args, kwargs, _m=m, _model=trainer.model):
            grads[_m] = torch.cat([p.grad.flatten() for p in _model.parameters()])

        trainer.optimizer.register_step_pre_hook(capture)
        trainer.fit(source, _loss_fn)
    torch.testing.assert_close(grads[micro], grads[16])


@pytest.mark.parametrize("clip", [1e-3, 1e6, 0.0])
def test_gradients_are_clipped_as_torch_clips_them_only_over_the_limit(tmp_path, tokenizer, clip):
    trainer, source = _trainer(tmp_path, tokenizer, steps=1, batch=8, micro=8)
    trainer.optim_cfg = dataclasses.replace(trainer.optim_cfg, grad_clip=clip)
    reference = copy.deepcopy(trainer.model)
    seen = {}

    def loss_fn(model, batch, normaliser):
        seen["batch"], seen["normaliser"] = batch, normaliser
        return _loss_fn(model, batch, normaliser)

    def capture(optimizer, args, kwargs):
        seen["grads"] = [p.grad.clone() for p in trainer.model.parameters()]

    trainer.optimizer.register_step_pre_hook(capture)
    result = trainer.fit(source, loss_fn)
    # the reference: the same micro-batch's backward, then torch's clip_grad_norm_ as it is (0: no limit)
    reference.train()
    _loss_fn(reference, seen["batch"], seen["normaliser"])[0].backward()
    norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), clip or math.inf)
    for got, expected in zip(seen["grads"], (p.grad for p in reference.parameters()), strict=True):
        assert torch.equal(got, expected)
    assert result.last["grad_norm"] == norm.item()
    assert (norm.item() > clip > 0) == (clip == 1e-3)  # the small limit clips, the others do not


def test_two_runs_with_one_seed_log_identical_metrics(tmp_path, tokenizer):
    for name in ("a", "b"):
        trainer, source = _trainer(tmp_path, tokenizer, name=name, steps=4)
        trainer.fit(source, _loss_fn)
    a = _untimed(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    b = _untimed(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert a == b and len(a) == 4


def test_a_run_stopped_part_way_along_a_longer_schedule_is_the_longer_run_up_to_that_step(tmp_path, tokenizer):
    full, source = _trainer(tmp_path, tokenizer, name="full", steps=8, save_every=5)
    full.fit(source, _loss_fn)
    part, source = _trainer(tmp_path, tokenizer, name="part", steps=5, schedule_steps=8)
    part.fit(source, _loss_fn)
    full_records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part_records = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert _untimed(part_records) == _untimed(full_records[:5])
    # warm-up over 2 steps, then cosine over 8 - 2 to 0.1: the 3rd to 5th steps at progress 0, 1/6 and 2/6 (a
    # 5-step schedule would be at 0, 1/3 and 2/3: 1, 0.775, 0.325)
    by_hand = [1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 6)), 0.1 + 0.45 * 1.5]
    assert [r["lr"] for r in part_records[2:]] == pytest.approx([3e-3 * f for f in by_hand])
    load_module_weights(full.model, tmp_path / "full" / "checkpoints" / "step-5" / "model")
    assert torch.equal(_flat_params(part.model), _flat_params(full.model))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigterm_checkpoint_and_resume_are_bitwise_identical(tmp_path, tokenizer, precision):
    full, source = _trainer(tmp_path, tokenizer, name="full", steps=6, save_every=0, precision=precision)
    full.fit(source, _loss_fn)

    stopped, source = _trainer(tmp_path, tokenizer, name="split", steps=6, save_every=0, precision=precision)
    calls = {"n": 0}

    def loss_then_sigterm(model, batch, normaliser):
        calls["n"] += 1
        if calls["n"] == 5:  # first micro-batch of step 3: the step must still finish
            os.kill(os.getpid(), signal.SIGTERM)
        return _loss_fn(model, batch, normaliser)

    with pytest.raises(StoppedInTraining) as stop:  # to the caller, once the step is saved
        stopped.fit(source, loss_then_sigterm)
    assert stop.value.step == 3 and stop.value.signum == signal.SIGTERM
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step-3"]

    resumed, source = _trainer(tmp_path, tokenizer, name="split", steps=6, resume=True, save_every=0,
                               precision=precision)
    result = resumed.fit(source, _loss_fn)
    assert result.step == 6
    assert _untimed(read_metrics(tmp_path / "split" / "metrics.jsonl")) == \
        _untimed(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert torch.equal(_flat_params(resumed.model), _flat_params(full.model))


class _FailsAtStep:
    """A step source whose `step`-th step fails after its data walk has moved on (as a round whose prompts were
    drawn and whose rewards then all failed)."""

    def __init__(self, source, step: int) -> None:
        self.source, self.step, self.calls = source, step, 0

    def next_step(self):
        self.calls += 1
        batch = self.source.next_step()
        if self.calls == self.step:
            raise DataError("this round's rewards all failed", file="rewards.py")
        return batch

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def test_a_step_whose_data_fails_keeps_the_steps_before_it_and_the_resume_trains_it_again(tmp_path, tokenizer,
                                                                                           capsys):
    full, source = _trainer(tmp_path, tokenizer, name="full", steps=6, save_every=0)
    full.fit(source, _loss_fn)

    failed, source = _trainer(tmp_path, tokenizer, name="split", steps=6, save_every=0)
    with pytest.raises(DataError, match="rewards all failed"):
        failed.fit(_FailsAtStep(source, 5), _loss_fn)
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step-4"]
    assert "step 5 failed; the 4 steps before it are saved" in capsys.readouterr().out

    resumed, source = _trainer(tmp_path, tokenizer, name="split", steps=6, resume=True, save_every=0)
    assert resumed.fit(source, _loss_fn).step == 6
    assert _untimed(read_metrics(tmp_path / "split" / "metrics.jsonl")) == \
        _untimed(read_metrics(tmp_path / "full" / "metrics.jsonl"))  # step 5 on the batch it was to train
    assert torch.equal(_flat_params(resumed.model), _flat_params(full.model))

    first, source = _trainer(tmp_path, tokenizer, name="first", steps=6, save_every=0)
    with pytest.raises(DataError):  # nothing trained yet: nothing to keep (the stage undoes the run)
        first.fit(_FailsAtStep(source, 1), _loss_fn)
    assert list_checkpoints(tmp_path / "first" / "checkpoints") == []


def test_bf16_computes_the_matmuls_in_bf16_and_keeps_fp32_weights_and_optimizer_state(tmp_path, tokenizer):
    seen = {}

    def loss_fn(model, batch, normaliser):
        out = model(input_ids=batch, labels=batch)
        seen["logits"], seen["autocast"] = out.logits.dtype, torch.is_autocast_enabled("cpu")
        return _loss_fn(model, batch, normaliser)

    trainer, source = _trainer(tmp_path, tokenizer, name="bf16", steps=2, precision="bf16")
    result = trainer.fit(source, loss_fn)
    assert result.precision == "bf16" and seen == {"logits": torch.bfloat16, "autocast": True}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    moments = [t for state in trainer.optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    # The same first step in fp32: the loss differs by bf16 rounding (8 significant bits), not more.
    reference, source = _trainer(tmp_path, tokenizer, name="fp32", steps=2, precision="fp32")
    reference.fit(source, _loss_fn)
    bf16_loss, fp32_loss = (read_metrics(tmp_path / name / "metrics.jsonl")[0]["loss"] for name in ("bf16", "fp32"))
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=2**-8)


def test_periodic_checkpoints_keep_the_last_k(tmp_path, tokenizer):
    trainer, source = _trainer(tmp_path, tokenizer, steps=6, save_every=2, keep_last=2)
    trainer.fit(source, _loss_fn)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-4", "step-6"]
    for name in ("model/model.safetensors", "model/config.json", "optimizer-model.safetensors", "state.json",
                 "rng.safetensors", "config.yaml", "COMPLETE"):
        assert (root / "step-6" / name).is_file(), name
    fresh = build_model(ModelConfig(size="tiny"), tokenizer, seed=5)
    load_module_weights(fresh, root / "step-6" / "model")
    assert torch.equal(_flat_params(fresh), _flat_params(trainer.model))


def test_nonfinite_step_is_skipped_with_parameters_untouched(tmp_path, tokenizer):
    trainer, source = _trainer(tmp_path, tokenizer, steps=8, max_nonfinite=3, save_every=0)
    snapshots = {}

    def poisoned(model, batch, normaliser):
        step = trainer.step + 1
        snapshots.setdefault(step, _flat_params(model).clone())
        loss, metrics = _loss_fn(model, batch, normaliser)
        if step == 2 or step >= 4:
            loss = loss * float("nan")
        return loss, metrics

    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite"):
        trainer.fit(source, poisoned)
    assert torch.equal(snapshots[3], snapshots[2])  # step 2 was skipped
    assert not torch.equal(snapshots[4], snapshots[3])  # step 3 trained
    assert torch.equal(_flat_params(trainer.model), snapshots[4])  # steps 4-6 skipped, then stop
    assert trainer.skipped_steps == 4


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import posttrain.train.checkpoint as ckpt
        from test_engine import _trainer
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
        trainer, source = _trainer(__import__("pathlib").Path({str(tmp_path)!r}), tok, steps=4, save_every=2)
        real_fsync = ckpt._fsync_tree
        def slow_fsync(directory):
            real_fsync(directory)
            if directory.name == ".tmp-step-4":
                print("SAVING", flush=True)
                time.sleep(60)
        ckpt._fsync_tree = slow_fsync
        trainer.fit(source, __import__("test_engine")._loss_fn)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")  # the run's own messages come first
        assert any(line.strip() == "SAVING" for line in lines)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".tmp-step-4").is_dir() and latest_checkpoint(root) == root / "step-2"

    resumed, source = _trainer(tmp_path, tokenizer, steps=4, resume=True, save_every=2)
    result = resumed.fit(source, _loss_fn)
    assert result.step == 4 and latest_checkpoint(root) == root / "step-4"
    assert not (root / ".tmp-step-4").exists()


def test_a_data_walk_resumed_on_data_of_another_size_is_refused_not_spun_forever():
    """A checkpoint 16 rows into 32, resumed where the data has 8 rows (a smaller data.size, an edited file): before,
    the walk found no row past position 16 of 8 and looped forever; now it is a ConfigError."""
    from posttrain.errors import ConfigError

    def source(size):
        return ShuffledStepSource(size, 4, 4, 0, collate=list, count=lambda indices: (len(indices), 0))

    walked = source(32)
    for _ in range(4):
        walked.next_step()
    state = walked.state_dict()
    # a checkpoint that kept its size; one from before (its position past the end); 31 rows: the position fits
    for size, saved in ((8, state), (8, {"epoch": 0, "position": 16}), (31, state)):
        with pytest.raises(ConfigError, match="trains on the data it started with") as err:
            source(size).load_state_dict(saved)
        assert err.value.field == "data"
    same = source(32)
    same.load_state_dict(state)
    assert same.next_step().micro_batches == walked.next_step().micro_batches


def test_a_data_walk_resumed_on_other_rows_of_the_same_count_is_refused():
    """The size alone let a resume go on over an edited file, or another file of as many rows, silently. The state
    keeps a digest of the rows' contents, the same however they are stored (Arrow chunks of a cached or freshly
    tokenised dataset) or held (a tensor of pretraining blocks)."""
    from datasets import Dataset, concatenate_datasets

    from posttrain.errors import ConfigError

    def source(rows):
        return ShuffledStepSource(len(rows), 4, 4, 0, collate=list, count=lambda indices: (len(indices), 0), rows=rows)

    rows = [{"input_ids": [1, 2, i], "response_mask": [0, 1, 1]} for i in range(8)]
    walked = source(Dataset.from_list(rows))
    walked.next_step()
    state = walked.state_dict()
    rechunked = concatenate_datasets([Dataset.from_list(rows[:3]), Dataset.from_list(rows[3:])])
    source(rechunked).load_state_dict(state)  # the same rows in two chunks: resumed
    edited = [dict(r) for r in rows]
    edited[5] = {"input_ids": [1, 2, 99], "response_mask": [0, 1, 1]}
    for other in (Dataset.from_list(edited), Dataset.from_list(rows[::-1])):
        with pytest.raises(ConfigError, match="other rows of training data than this run has") as err:
            source(other).load_state_dict(state)
        assert err.value.field == "data"
    blocks = torch.arange(32).view(8, 4)
    tensor_state = source(blocks).state_dict()
    source(blocks.clone()).load_state_dict(tensor_state)
    with pytest.raises(ConfigError, match="other rows"):
        source(blocks + 1).load_state_dict(tensor_state)


def test_the_data_compared_on_resume_is_the_rows_as_read_not_as_templated(tmp_path, tokenizer):
    """A chat template may print the day's date (Llama 3's does), so the token ids of the same rows change from day
    to day: a resume compares the rows as read (`Prepared.source`). Another rendering of the same file resumes;
    an edited file does not; rows handed in memory (those a run samples or scores itself) are not compared at all."""
    import json

    from posttrain.data import DataConfig, prepare_data
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.errors import ConfigError
    from posttrain.recipes.sft import step_source

    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"What is {i}+1?", "completion": str(i + 1)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = TrainConfig(batch_size=4, micro_batch_size=4)

    def walk(template, in_memory=False):
        prepared = prepare_data(DataConfig(source=str(path), template=template, cache_dir=str(tmp_path / "cache")),
                                tokenizer, accepts=STAGE_FORMATS["sft"], rows=rows if in_memory else None)
        return prepared, step_source(prepared, train, seed=0)

    chat, walked = walk("chat")
    walked.next_step()
    state = walked.state_dict()
    plain, resumed = walk("plain")
    assert plain.dataset["input_ids"] != chat.dataset["input_ids"]  # other token ids, the same rows
    resumed.load_state_dict(state)
    rows[5]["completion"] = "7"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="other rows of training data"):
        walk("chat")[1].load_state_dict(state)
    walk("chat", in_memory=True)[1].load_state_dict({k: v for k, v in state.items() if k != "digest"})
    assert "digest" not in walk("chat", in_memory=True)[1].state_dict()


def test_a_warm_up_as_long_as_the_run_is_pointed_out(tmp_path, tokenizer, capsys):
    """optim.warmup_steps >= train.max_steps: the lr never reaches optim.lr and never decays, silently (a recipe's
    warm-up beside a short max_steps)."""
    for steps, said in ((2, True), (3, False)):  # _trainer's warm-up is 2 steps
        trainer, source = _trainer(tmp_path, tokenizer, name=f"warm-{steps}", steps=steps)
        trainer.fit(source, _loss_fn)
        out = " ".join(capsys.readouterr().out.split())
        assert ("optim.warmup_steps=2 is not shorter than the run's 2 steps" in out) == said, out


def test_a_run_resumed_with_a_lower_learning_rate_trains_at_it(tmp_path, tokenizer, capsys):
    """The way out of a diverged run: resume with a lower optim.lr. The checkpoint's optimizer and scheduler state
    carried the old peak lr back; now the config's peak applies from the resumed step, on the same schedule."""
    full, source = _trainer(tmp_path, tokenizer, name="full", steps=6, save_every=2, keep_last=3)
    full.fit(source, _loss_fn)
    shutil.copytree(tmp_path / "full", tmp_path / "split")  # as if stopped after its step-2 checkpoint
    for later in ("step-4", "step-6"):
        shutil.rmtree(tmp_path / "split" / "checkpoints" / later, ignore_errors=True)
    (tmp_path / "split" / "summary.json").unlink(missing_ok=True)
    resumed, source = _trainer(tmp_path, tokenizer, name="split", steps=6, resume=True, save_every=2, keep_last=3,
                               lr=3e-4)
    resumed.fit(source, _loss_fn)
    before = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    after = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "split" / "metrics.jsonl")}
    assert [after[step] for step in (1, 2)] == [before[1], before[2]]  # the steps before the checkpoint, kept
    assert [after[step] for step in (3, 4, 5, 6)] == pytest.approx([before[step] / 10 for step in (3, 4, 5, 6)],
                                                                   rel=1e-12)
    assert "initial_lr 0.003 -> 0.0003" in " ".join(capsys.readouterr().out.split())


def test_a_resume_with_another_seed_is_refused_and_the_run_stays_resumable_with_its_own(tmp_path, tokenizer):
    """The seed drew the data order (a resumed position in another permutation trains some rows twice and skips
    others), the rollouts' sampling and, in pretraining, the tokenizer the checkpoint was trained on: a resume with
    another run.seed is a clear error before anything is loaded or trained, and the run's own seed still resumes it
    to exactly the uninterrupted run."""
    full, source = _trainer(tmp_path, tokenizer, name="full", steps=4, save_every=2, keep_last=3)
    full.fit(source, _loss_fn)
    shutil.copytree(tmp_path / "full", tmp_path / "split")  # as if stopped after its step-2 checkpoint
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-4")
    (tmp_path / "split" / "summary.json").unlink(missing_ok=True)
    metrics_before = (tmp_path / "split" / "metrics.jsonl").read_text()
    other, source = _trainer(tmp_path, tokenizer, name="split", steps=4, resume=True, save_every=2, keep_last=3, seed=1)
    with pytest.raises(ConfigError, match=r"run\.seed: the checkpoint step-2 was trained with run\.seed=0 and this "
                                          r"run has run\.seed=1"):
        other.fit(source, _loss_fn)
    assert (tmp_path / "split" / "metrics.jsonl").read_text() == metrics_before
    assert "seed: 0" in (tmp_path / "split" / "config.yaml").read_text()  # the checkpoint's own config, put back
    resumed, source = _trainer(tmp_path, tokenizer, name="split", steps=4, resume=True, save_every=2, keep_last=3)
    resumed.fit(source, _loss_fn)
    assert _untimed(read_metrics(tmp_path / "split" / "metrics.jsonl")) == _untimed(
        read_metrics(tmp_path / "full" / "metrics.jsonl"))


def test_a_resume_that_changes_what_the_checkpoint_s_tensors_are_is_refused_naming_the_setting(tmp_path):
    """A changed adapter rank, model, tokenizer or critic kind failed in torch's loading with a message cut at
    its first line ("Error(s) in loading state_dict for LlamaForCausalLM:"), as if the checkpoint were damaged."""
    from posttrain.train.checkpoint import check_kept_settings

    checkpoint = tmp_path / "step-4"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text("run:\n  seed: 0\nmodel:\n  path: runs/sft/final\nadapter:\n"
                                            "  method: lora\n  r: 16\n  target_modules: [all-linear]\n")
    same = {"run.seed": 0, "model.path": "runs/sft/final", "adapter.method": "lora", "adapter.r": 16,
            "adapter.target_modules": ("all-linear",), "critic.kind": "separate"}  # not in that config: unchecked
    check_kept_settings(checkpoint, same)
    # model.path is checked by the model's files, not their path (tests/e2e/test_runs.py, the model that moved).
    for key, value in (("adapter.r", 8), ("adapter.target_modules", ["q_proj"])):
        with pytest.raises(ConfigError, match=rf"the checkpoint step-4 was trained with {key}=.* and this run has "
                                              rf"{key}=.*: a resumed run keeps it") as err:
            check_kept_settings(checkpoint, same | {key: value})
        assert err.value.field == key


def test_a_checkpoint_that_does_not_load_says_what_did_not_fit(tmp_path, monkeypatch):
    from posttrain.errors import RunDirError
    from posttrain.train import checkpoint

    def torch_refuses(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for LlamaForCausalLM:\n\tsize mismatch for "
                           "model.embed_tokens.weight: copying a param with shape torch.Size([475, 128])")

    monkeypatch.setattr(checkpoint, "_load_checkpoint", torch_refuses)
    with pytest.raises(RunDirError, match=r"cannot resume from this checkpoint: Error\(s\) in loading state_dict for "
                                          r"LlamaForCausalLM: size mismatch for model.embed_tokens.weight"):
        checkpoint.load_checkpoint(tmp_path, modules={}, optimizers={}, schedulers={})


def test_a_full_disk_while_checkpointing_is_a_clear_error_that_leaves_no_half_checkpoint(tmp_path, tokenizer,
                                                                                         monkeypatch):
    import errno

    from posttrain.errors import RunDirError
    from posttrain.train import checkpoint

    trainer, source = _trainer(tmp_path, tokenizer, name="full", steps=4, save_every=2, keep_last=3)
    save_file = checkpoint.save_file

    def disk_full_at_step_4(tensors, filename):
        if "step-4" in filename:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return save_file(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_step_4)
    with pytest.raises(RunDirError, match=r"No space left on device.*step-2, is kept"):
        trainer.fit(source, _loss_fn)
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step-2"]


def test_safetensors_failing_to_write_a_checkpoint_is_the_same_clear_error(tmp_path, tokenizer, monkeypatch):
    """safetensors' writer raises its own SafetensorError, not an OSError, when the disk fails it: the optimizer
    state or the RNGs of a checkpoint on a full disk ended the run with its traceback and left the half-written
    copy. A real failure: the process's file-size limit lowered while step 4's optimizer state is written."""
    import resource
    import signal

    from posttrain.errors import RunDirError
    from posttrain.train import checkpoint

    trainer, source = _trainer(tmp_path, tokenizer, name="big", steps=4, save_every=2, keep_last=3)
    save_file = checkpoint.save_file

    def file_size_limit_at_step_4(tensors, filename):
        if "step-4" not in filename:
            return save_file(tensors, filename)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return save_file(tensors, filename)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(checkpoint, "save_file", file_size_limit_at_step_4)
    with pytest.raises(RunDirError, match=r"checkpoint of step 4 \(File too large\); the last complete one, step-2"):
        trainer.fit(source, _loss_fn)
    assert [p.name for p in (tmp_path / "big" / "checkpoints").iterdir()] == ["step-2"]


def test_a_skipped_step_logs_no_partial_loss_trains_no_tokens_and_stops_no_rule(tmp_path, tokenizer, recwarn):
    """The second micro-batch of step 4 is NaN: the step logged the first one's loss (a quarter of the step's, so
    `loss < 2` ended the run on it), counted its tokens as trained, and a skipped first step drew torch's warning
    that the schedule's first value was skipped. Nothing of the sort now; the summary counts skipped steps."""
    trainer, source = _trainer(tmp_path, tokenizer, name="nan", steps=6, save_every=0, micro=2,
                               stop_when="loss < 2.0")
    micro_batches: dict[int, int] = {}

    def poisoned(model, batch, normaliser):
        step = trainer.step + 1
        micro_batches[step] = micro_batches.get(step, 0) + 1
        loss, metrics = _loss_fn(model, batch, normaliser)
        if (step, micro_batches[step]) in ((1, 1), (4, 2)):  # step 1's first micro-batch, step 4's second
            loss = loss * float("nan")
        return loss, metrics

    result = trainer.fit(source, poisoned)
    records = {r["step"]: r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl")}
    assert result.step == 6 and result.stopped_by is None  # the rule was neither refused nor met on a skipped step
    assert records[1]["loss"] is None and records[4]["loss"] is None and records[4]["nonfinite"]
    assert all(records[s]["loss"] > 2.0 for s in (2, 3, 5, 6))
    trained = [r["tokens"] for r in records.values()]
    assert result.tokens == trained[-1] == 4 * 8 * SEQ  # steps 2, 3, 5, 6
    assert result.totals()["skipped_steps"] == 2
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_a_resume_with_a_longer_schedule_trains_its_first_step_on_it_and_counts_time_across_sessions(tmp_path,
                                                                                                    tokenizer):
    """Raising max_steps on resume: the first resumed step trained at the old schedule's last lr, the next ones on
    the new; and elapsed_s and the summary's seconds started again from 0."""
    first, source = _trainer(tmp_path, tokenizer, name="longer", steps=4, save_every=2)
    first_seconds = first.fit(source, _loss_fn).seconds
    resumed, source = _trainer(tmp_path, tokenizer, name="longer", steps=8, resume=True, save_every=2)
    result = resumed.fit(source, _loss_fn)
    records = read_metrics(tmp_path / "longer" / "metrics.jsonl")
    cfg = OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine")
    assert [r["lr"] for r in records[4:]] == pytest.approx([3e-3 * lr_factor(s, 8, cfg) for s in range(4, 8)],
                                                           rel=1e-12)
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and result.seconds > first_seconds


def test_metrics_reach_the_disk_before_each_checkpoint(tmp_path, tokenizer, monkeypatch):
    """Checkpoints are synced to disk and metrics.jsonl was only flushed to the kernel: after a power cut a
    checkpoint could outlive the records of its steps. Each save now syncs the records first."""
    import os

    trainer, source = _trainer(tmp_path, tokenizer, name="synced", steps=4, save_every=2, keep_last=3)
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    trainer.fit(source, _loss_fn)
    metrics = str(tmp_path / "synced" / "metrics.jsonl")
    for step in (2, 4):  # the first file of each checkpoint synced comes after the metrics
        first = next(i for i, path in enumerate(synced) if f".tmp-step-{step}" in path)
        assert metrics in synced[:first] and synced[:first].count(metrics) == step // 2


def test_a_library_warning_raised_in_every_step_is_shown_once(tmp_path, tokenizer):
    """The scheduler's step was wrapped in a warnings filter set and undone at every step, which resets Python's
    once-per-place record: a warning a library raises in each step (a deprecation in a model's forward) was printed
    at every step (12 times in 12 steps)."""
    import warnings

    def warning_loss(model, batch, normaliser):
        warnings.warn("a deprecated argument", FutureWarning, stacklevel=1)  # one place, every micro-batch
        return _loss_fn(model, batch, normaliser)

    trainer, source = _trainer(tmp_path, tokenizer, steps=4, save_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per place
        trainer.fit(source, warning_loss)
    assert [str(w.message) for w in caught if w.category is FutureWarning] == ["a deprecated argument"]


@pytest.mark.parametrize(("size", "batch"), [(10, 4), (10, 3), (7, 7), (9, 8), (64, 24)])
def test_no_step_holds_a_row_twice_and_every_epoch_sees_each_row_once(size, batch):
    """A batch straddling two epochs was filled from the next epoch's shuffle without regard to its own rows: 10
    rows in batches of 4 trained row 6 twice in one step ([2, 5, 6, 6]). The walk, and a resume at every step, by
    a slow obvious check."""

    def source():
        return ShuffledStepSource(size, batch, batch, 3, collate=list, count=lambda indices: (len(indices), 0))

    walked, steps = source(), []
    for _ in range(40):
        state = walked.state_dict()
        steps.append(walked.next_step().micro_batches[0])
        resumed = source()
        resumed.load_state_dict(state)
        assert resumed.next_step().micro_batches[0] == steps[-1]  # the same rows after a resume here
    for rows in steps:
        assert len(rows) == batch and len(set(rows)) == batch, rows
    walk = [row for rows in steps for row in rows]
    for epoch in range(len(walk) // size):
        assert sorted(walk[epoch * size:(epoch + 1) * size]) == list(range(size)), epoch
    assert any(walk[:size] != walk[e * size:(e + 1) * size] for e in range(1, len(walk) // size))  # reshuffled


def test_a_log_file_gets_a_progress_line_every_log_every_steps(tmp_path, tokenizer):
    """On a console that is not a terminal rich draws no live bar: a run of hours printed nothing from its start
    lines to its end, and run.log_every was read nowhere."""
    import io

    from rich.console import Console

    from posttrain.train.progress import RunProgress

    out = io.StringIO()
    trainer, source = _trainer(tmp_path, tokenizer, steps=6)
    trainer.progress = RunProgress(True, Console(file=out, force_terminal=False, width=80))
    trainer.run = dataclasses.replace(trainer.run, log_every=2)
    trainer.fit(source, _loss_fn, progress_keys=("loss",))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("test step ")]
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss " in line and " elapsed 0:00:" in line and " eta " in line for line in lines)
    assert max(map(len, lines)) > 80  # one line each, not wrapped at the log console's 80 columns


def test_a_skipped_step_and_data_shorter_than_a_batch_are_said_at_once(tmp_path, tokenizer, capsys):
    trainer, _ = _trainer(tmp_path, tokenizer, steps=2, batch=8, micro=8, max_nonfinite=5)
    data = _data(tokenizer, n=5)
    source = ShuffledStepSource(len(data), 8, 8, 0, collate=lambda idx: data[idx],
                                count=lambda idx: (len(idx) * (SEQ - 1), len(idx) * SEQ))

    def nan_at_step_2(model, batch, normaliser):
        loss, metrics = _loss_fn(model, batch, normaliser)
        return (loss * math.nan if trainer.step == 1 else loss), metrics

    trainer.fit(source, nan_at_step_2)
    said = " ".join(capsys.readouterr().out.split())
    assert "the training data has 5 rows (or packed rows), fewer than train.batch_size=8" in said
    assert "test: step 2 skipped: a non-finite loss or gradient; its batch is left untrained" in said


def test_the_logged_throughput_leaves_out_evaluations_and_checkpoint_saves(tmp_path, tokenizer):
    """tokens_per_s was the session's tokens over its wall time, evaluations and saves included (574 -> 256 tok/s
    in a run saving every step): not the training throughput the progress bar says it is."""
    import time as clock

    def slow_evaluation(step, final):
        clock.sleep(1.0)
        return {"dev_score": 1.0}

    trainer, source = _trainer(tmp_path, tokenizer, steps=4, eval_every=1, save_every=1)
    trainer.fit(source, _loss_fn, slow_evaluation)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["evaluation_s"] >= 1.0 for r in records)
    # by step 4, 3 s of evaluations were behind it: the wall-time throughput (old) is far lower
    last = records[-1]
    assert last["tokens_per_s"] > 1.5 * last["tokens"] / last["elapsed_s"]


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 20971520000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_a_micro_batch_out_of_memory_is_one_line_naming_the_micro_batch_size(tmp_path, tokenizer, failure):
    """A user's model with the recipe's default micro-batch (64 rows of 1,000 tokens: 19 GB) died with a traceback
    from inside the model's forward."""
    from posttrain.train.engine import TrainingError

    trainer, source = _trainer(tmp_path, tokenizer, steps=3, batch=8, micro=4)

    def loss_fn(model, batch, normaliser):
        if trainer.step == 1:
            raise failure
        return _loss_fn(model, batch, normaliser)

    with pytest.raises(TrainingError, match=r"out of memory in micro-batch 1 of 2 of step 2 .*lower "
                                            r"train.micro_batch_size \(now 4; the optimizer step stays "
                                            r"train.batch_size=8") as err:
        trainer.fit(source, loss_fn)
    assert err.value.field == "train.micro_batch_size" and "\n" not in err.value.message
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is the error it was
        trainer, source = _trainer(tmp_path, tokenizer, name="other", steps=1)
        trainer.fit(source, lambda model, batch, normaliser: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_a_resume_with_another_batch_size_or_from_an_older_checkpoint_walks_each_row_once_an_epoch():
    """The deferral of a straddling step's rows was computed from the batch size: a resume with another
    train.batch_size, or from a checkpoint of the plain shuffle, trained some rows of the epoch twice, others never."""

    def source(batch):
        return ShuffledStepSource(10, batch, batch, 3, collate=list, count=lambda indices: (len(indices), 0))

    first = source(4)
    walk = [row for _ in range(3) for row in first.next_step().micro_batches[0]]  # 12 rows: into epoch 1
    resumed = source(3)
    resumed.load_state_dict(first.state_dict())
    walk += [row for _ in range(6) for row in resumed.next_step().micro_batches[0]]  # 18 more: to the end of epoch 2
    assert sorted(walk[:10]) == sorted(walk[10:20]) == sorted(walk[20:30]) == list(range(10))
    # A checkpoint from before the straddling rows were kept walked the plain shuffle: it goes on in it.
    old = source(4)
    old.load_state_dict({"epoch": 1, "position": 2, "size": 10})
    assert old._order == old._shuffled(1)
