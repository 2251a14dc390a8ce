"""The one training loop every stage uses.

A recipe supplies three things and the `Trainer` does the rest (accumulation, clipping, the optimizer
and schedule, the non-finite guard, metrics, progress, evaluation, checkpoints, resume, signals):

- a `StepSource`: `next_step()` returns the micro-batches of one optimizer step and the global
  normaliser (token or sequence count of the *whole* step), and has a JSON-able `state_dict()` so a
  resumed run continues from the same data position;
- a loss function `loss_fn(model, micro_batch, normaliser) -> (loss, metrics)`: the loss is already
  divided by the global normaliser, so summing micro-batch gradients gives the full-batch gradient
  (1x16, 4x4 and 16x1 agree); `metrics` are weighted the same way, so they are summed too;
- optionally `evaluate(step, final) -> metrics` (`Evaluate`), called every `eval_every` steps and at the
  end, where `train.stop_when` may end the run early.

A source that samples (the RL stages) does its generation and scoring inside `next_step()` and
reports step-level statistics in `StepBatch.metrics`; when they include `generation_s`, the record
also gets `generation_share`, the share of the step's wall time spent producing the batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import statistics
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from posttrain.config import OptimConfig, RunConfig, param, to_dict
from posttrain.console import run_console
from posttrain.errors import ConfigError, PosttrainError, RunDirError
from posttrain.models.heads import floating_dtype
from posttrain.models.io import model_fingerprint
from posttrain.models.kernels import use_fast_kernels
from posttrain.models.precision import PRECISIONS, autocast, resolve_precision
from posttrain.train import dist
from posttrain.train.allocator import keep_freed_memory
from posttrain.train.checkpoint import (
    KEPT_ON_RESUME,
    MODEL_PATHS,
    check_kept_settings,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from posttrain.train.dist_checkpoint import check_world_size, load_sharded_checkpoint, save_sharded_checkpoint
from posttrain.train.metrics import MetricsWriter, truncate_metrics, truncate_samples
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.progress import RunProgress, TrainProgress, format_metrics
from posttrain.train.run_dir import RunDir, config_text
from posttrain.train.signals import StoppedInTraining, StopRequest
from posttrain.train.stop_rule import StopRule
from posttrain.train.trackers import Trackers


class TrainingError(PosttrainError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    max_steps: int = param(200, "Optimizer steps.", ge=1)
    batch_size: int = param(16, "Samples per optimizer step, across all micro-batches (packed rows with "
                                "data.batch_mode=packed, as in TRL's packing).", ge=1)
    micro_batch_size: int = param(16, "Samples per forward/backward pass (divides batch_size).", ge=1)
    save_every: int = param(100, "Checkpoint every N steps and at the last one (0: only at the last step and when "
                                 "stopped by a signal).", ge=0)
    keep_last: int = param(2, "Checkpoints to keep (older ones are deleted once a new one is complete).", ge=1)
    eval_every: int = param(0, "Evaluate every N steps (0: only at the end).", ge=0)
    max_nonfinite: int = param(5, "Stop after this many consecutive skipped steps (a non-finite loss or gradient, "
                                  "or a gradient-norm spike).", ge=1)
    spike_factor: float = param(10.0, "Skip a step whose gradient norm (before clipping) exceeds this many times "
                                      "the median of the last spike_warmup trained steps' (0: off). Every stage of "
                                      "the demo stays under 5x.", ge=0)
    spike_warmup: int = param(20, "Trained steps the spike guard's median is taken over; it acts once it has them.",
                              ge=1)
    max_weight_growth: float = param(10.0, "Stop the run when one optimizer step multiplies the norm of the "
                                           "trainable weights by more than this (a learning rate far too large: "
                                           "no healthy step changes it by more than a few percent), before that "
                                           "step is saved, so the checkpoints keep the weights from before it "
                                           "(0: off).", ge=0)
    parallel: str = param("ddp", "Under torchrun: ddp replicates the model on every rank; fsdp shards parameters, "
                                 "gradients and optimizer state (FSDP2). batch_size stays the global batch, "
                                 "micro_batch_size is per rank.", choices=dist.PARALLEL_MODES)
    precision: str = param("fp32", "Matmul precision of every forward (training, reference, rollouts, evaluation): "
                                   "bf16 autocast with fp32 weights, optimizer state, logprobs and losses; auto = "
                                   "bf16 where the CPU/GPU computes bf16 natively (AVX512_BF16, AMX), else fp32.",
                           choices=PRECISIONS)
    stop_when: str | None = param(None, "End the run early at the first step whose logged metrics meet this rule, "
                                        "METRIC OP NUMBER (e.g. 'dev_step_accuracy >= 0.55', OP one of >= > <= <): "
                                        "an evaluation metric is read at each evaluation (train.eval_every), a "
                                        "training one at every step. The run then saves, and runs the evaluation "
                                        "it would run at its last step; a resumed run that met it stays ended (a run "
                                        "that evaluates only at its last step can stop on training metrics only). "
                                        "Stop on a dev draw (eval.dev_problems), not on the test problems.")

    def check(self, world_size: int = 1) -> None:
        """Refuse a batch that micro-batches (on every one of `world_size` ranks) do not divide, and a stopping rule
        that is not one. Called before a run loads anything (`run_dir.check_run_dir`) and again by the Trainer; not
        when the config is built, so that tests and library users may split a batch unevenly by hand (the RL
        losses are invariant to it)."""
        if self.batch_size % self.micro_batch_size:
            fits = max([d for d in range(1, min(self.batch_size, self.micro_batch_size) + 1)
                        if self.batch_size % (d * world_size) == 0] or [1])
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}: set train.micro_batch_size={fits} (rows per forward; the "
                              "batch is the same)", field="train.micro_batch_size")
        if self.batch_size % (self.micro_batch_size * world_size):
            raise ConfigError(f"batch_size {self.batch_size} (global) is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size} x {world_size} ranks", field="train.batch_size")
        StopRule.parse(self.stop_when)


@dataclasses.dataclass
class StepBatch:
    micro_batches: list[Any]
    normaliser: float
    tokens: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class StepSource(Protocol):
    def next_step(self) -> StepBatch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """A step source's state taken earlier, saved in its place (`Trainer._keep_the_steps_before_a_failed_one`)."""

    state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.state


LossFn = Callable[[torch.nn.Module, Any, float], tuple[torch.Tensor, dict[str, float]]]


class Evaluate(Protocol):
    def __call__(self, step: int, final: bool) -> dict[str, Any]:
        """The held-out metrics of the model at `step`. `final`: the run ends at this step (its last step, or a
        stopping rule met), so also measure what is measured only once, at the end (e.g. the test problems when
        the periodic evaluations score a dev draw); an evaluation may reuse what it measured at the same step."""
        ...


def once_per_step(measure: Callable[[int], dict[str, Any]]) -> Evaluate:
    """The `Evaluate` of an evaluation with nothing measured only at the end: `measure(step)`, run once per step
    (the Trainer asks again, `final`, at the step a stopping rule ends the run at)."""
    last: dict[int, dict[str, Any]] = {}

    def evaluate(step: int, final: bool = True) -> dict[str, Any]:
        if step not in last:
            last.clear()
            last[step] = measure(step)
        return last[step]

    return evaluate


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    last: dict[str, Any]
    tokens: int
    seconds: float
    skipped_steps: int
    precision: str
    device: str = "cpu"
    stopped_by: str | None = None
    """The train.stop_when rule that ended the run before max_steps, with the value that met it (None: it did not)."""
    processes: int = 1
    """The ranks it ran on (torchrun), which a resume must have again; `parallel` their layout (ddp or fsdp)."""
    parallel: str | None = None

    def totals(self) -> dict[str, Any]:
        """What every stage's summary reports about its training."""
        stopped = {} if self.stopped_by is None else {"stopped_by": self.stopped_by}
        ranks = {"processes": self.processes, "parallel": self.parallel} if self.processes > 1 else {}
        return {"steps": self.step, "tokens": self.tokens, "seconds": self.seconds,
                "skipped_steps": self.skipped_steps, "precision": self.precision, "device": self.device, **ranks,
                **stopped}


def forward_precision(train: TrainConfig, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`train.precision`'s autocast for the forwards a recipe runs before the Trainer exists (the
    evaluation before training, a reference pass), so they match the ones inside the loop."""
    device = next(model.parameters()).device
    return autocast(resolve_precision(train.precision, device)[0], device)


class Trainer:
    def __init__(self, *, stage: str, cfg: Any, run: RunConfig, train: TrainConfig, optim: OptimConfig,
                 run_dir: RunDir, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None,
                 console: Console | None = None, progress: RunProgress | None = None,
                 lr_by_prefix: Mapping[str, float] | None = None) -> None:
        """`lr_by_prefix`: a peak lr of their own for the parameters whose names start with a prefix (PPO's
        critic); every other parameter trains at optim.lr."""
        keep_freed_memory()  # glibc keeps a step's large temporaries for the next one (`train.allocator`)
        self.dist = dist.init_distributed()
        train.check(self.dist.world_size)
        self.stage, self.cfg, self.run, self.train_cfg, self.optim_cfg = stage, cfg, run, train, optim
        self.run_dir = run_dir
        self.model = model
        self.tokenizer = tokenizer  # saved in every checkpoint's model directory, which then loads on its own
        self.console = console or (progress.console if progress is not None else run_console())
        # The run's display, shared with the phases a step source or an evaluation runs inside the loop.
        self.progress = progress or RunProgress(self.run.progress and self.dist.is_main, self.console)
        use_fast_kernels(model)  # a model built or loaded elsewhere trains on the faster kernels too
        # Wrapped (and, under FSDP, sharded) before the optimizer sees the parameters; on the process's device
        # (a model built on the CPU moves to the GPU there) before its precision is decided for that device.
        self.parallel = dist.DistributedModel(model, train.parallel)
        self.device = self.parallel.ctx.device
        self.precision, self.precision_reason = resolve_precision(train.precision, self.device)
        weights = floating_dtype(model)
        if weights.itemsize < 4:  # model.dtype=bfloat16/float16: the weights themselves, whatever the autocast
            self.precision_reason += f"; weights in {str(weights).removeprefix('torch.')}"
        self.optimizer = build_optimizer(model, optim, lr_by_prefix)
        # What an error that blames the learning rate names: optim.lr, and the peak lr of parameters with their own.
        own: dict[float, list[str]] = {}
        for prefix, lr in (lr_by_prefix or {}).items():
            own.setdefault(lr, []).append(f"{prefix}*")
        self._lr_settings = "optim.lr" + "".join(f" or the lr {lr:g} of {', '.join(names)}"
                                                 for lr, names in own.items())
        self.scheduler = build_scheduler(self.optimizer, optim, optim.schedule_steps or train.max_steps)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.tokens = 0
        self.elapsed_s = 0.0  # wall time of the run's steps over every session (a resume adds to it)
        self.skipped_steps = 0
        self._nonfinite_in_a_row = 0
        # The spike guard's window (gradient norms of trained steps), and the first skipped step: the newest
        # checkpoint from before it is never pruned, so a diverged run keeps weights it can be resumed from.
        self._grad_norms: deque[float] = deque(maxlen=train.spike_warmup)
        self._first_skipped: int | None = None
        self._resumed_last: dict[str, Any] = {}
        # (train.stop_when, the value that met it) once the rule stopped the run: a resume with the same rule stays
        # ended; with another rule, or none, it trains on.
        self._stopped: tuple[str, str] | None = None
        # The trainable weights' norm after the last update (None: not measured since they were last loaded).
        self._weight_norm: float | None = None
        # The files of the models the run reads (the one it started from, its reference and reward models), kept in
        # its checkpoints: a resume finds each by them wherever it was moved (`checkpoint.check_model_files`), and
        # refuses other files under its old path.
        self._model_files: dict[str, Any] = {}
        for key, name in MODEL_PATHS.items():
            section, _, setting = key.partition(".")
            where = getattr(getattr(cfg, section, None), setting, None)
            if isinstance(where, str) and Path(where).is_dir():
                self._model_files[name] = model_fingerprint(where)

    # ------------------------------------------------------------------------------------------

    def fit(self, source: StepSource, loss_fn: LossFn, evaluate: Evaluate | None = None,
            progress_keys: tuple[str, ...] = ("loss",)) -> TrainResult:
        resumed_from = self._maybe_resume(source)
        start, stopped_by_signal, session_start = time.perf_counter(), None, self.step
        earlier_s = self.elapsed_s  # the sessions before a resume: elapsed_s and seconds count the whole run
        session_tokens = 0
        aside_s = 0.0  # this session's evaluations and checkpoint saves: not part of the training throughput
        last = self._resumed_last  # a resume with no step left still reports the last step's metrics
        rule = StopRule.parse(self.train_cfg.stop_when)
        # A run that its rule stopped stays ended while the rule is the same (raising max_steps does not undo it).
        stopped_by = self._stopped[1] if self._stopped is not None and self._stopped[0] == str(rule) else None
        if stopped_by is None:  # trained on past a stop (another rule, or none): later checkpoints do not record it
            self._stopped = None
        rule_checked = False  # whether the rule's metric was looked for (once, where every metric is logged)
        main = self.dist.is_main  # only rank 0 writes metrics, trackers, progress and messages
        trackers = Trackers(self.run_dir.path, self.run.name, self.run.tensorboard and main, self.run.wandb and main,
                            to_dict(self.cfg))
        samples_from_policy = getattr(source, "samples_from_policy", False)
        with StopRequest() as stop, MetricsWriter(self.run_dir.metrics) if main else _NoMetrics() as metrics, \
                TrainProgress(self.stage, self.train_cfg.max_steps, display=self.progress,
                              log_every=self.run.log_every) as progress:
            progress.update(self.step)
            if main:
                self.console.print(f"{self.stage}: {self.precision} on {self.device} ({self.precision_reason})")
                note = self._warmup_note()
                if note:
                    self.console.print(f"{self.stage}: note: {note}")
            if resumed_from is not None and main:
                self.console.print(f"resumed from {resumed_from} (step {self.step})")
            rows = getattr(source, "size", None)  # a walk over fixed data (a round's own rows may well be fewer)
            if main and rows is not None and rows < self.train_cfg.batch_size:
                self.console.print(f"[yellow]{self.stage}: the training data has {rows} rows (or packed rows), fewer "
                                   f"than train.batch_size={self.train_cfg.batch_size}[/]: every step "
                                   "holds some of them more than once, weighted as often in its loss; "
                                   f"train.batch_size={rows} or less trains each once a step")
            if stopped_by is not None and main:
                self.console.print(f"{self.stage}: the run was stopped at step {self.step} by train.stop_when "
                                   f"({stopped_by}); to train on, give it another rule or train.stop_when=null")
            while self.step < self.train_cfg.max_steps and stopped_by is None:
                step_start = time.perf_counter()
                # A sampling source reads the policy's weights directly: under FSDP they are gathered for it.
                before = None if self.dist.distributed else copy.deepcopy(source.state_dict())
                with self.parallel.full_weights() if samples_from_policy else contextlib.nullcontext(), \
                        self.autocast():
                    try:
                        batch = source.next_step()
                    except Exception:
                        self._keep_the_steps_before_a_failed_one(before)
                        raise
                batch.metrics = dist.mean_over_ranks(batch.metrics)
                record = self._optimizer_step(batch, loss_fn)
                session_tokens += batch.tokens
                elapsed = time.perf_counter() - start
                self.elapsed_s = earlier_s + elapsed
                record.update(batch.metrics, step_time_s=time.perf_counter() - step_start, elapsed_s=self.elapsed_s,
                              tokens=self.tokens, tokens_per_s=session_tokens / max(elapsed - aside_s, 1e-9))
                if "generation_s" in record:
                    record["generation_share"] = record["generation_s"] / max(record["step_time_s"], 1e-9)
                at_end = self.step == self.train_cfg.max_steps
                evaluated = evaluate is not None and self._due(self.train_cfg.eval_every, final=True)
                if evaluated:
                    eval_start = time.perf_counter()
                    record.update(self._evaluate(evaluate, final=at_end))
                    record["evaluation_s"] = time.perf_counter() - eval_start
                    aside_s += record["evaluation_s"]
                if rule is not None and not rule_checked and not at_end and not record.get("nonfinite") and (
                        evaluated or not self._evaluates_early(evaluate)):
                    rule_checked = True  # the record has every metric the run logs before its last step
                    try:
                        rule = self._readable(rule, record, evaluated, evaluates=evaluate is not None)
                    except ConfigError as refused:
                        if not evaluated:  # the run's first step: nothing worth keeping yet
                            raise
                        # at an evaluation, perhaps many steps in: the run so far is kept before it stops
                        metrics.write(record)
                        if main:
                            self.run_dir.begin_training()
                        path = self.save(source)
                        raise ConfigError(f"{refused.message}. The run so far is saved ({path}): resume it with a "
                                          "train.stop_when on a metric it logs", field=refused.field) from None
                stopped_by = None if at_end else self._stopped_by(rule, record)
                if stopped_by is not None:
                    self._stopped = (str(rule), stopped_by)  # saved with the checkpoint below
                    if evaluate is not None:
                        record.update(self._evaluate(evaluate, final=True))  # what the run's last step would measure
                last = record
                metrics.write(record)
                if main:  # only now is an overwritten run deleted (see run_dir.py)
                    self.run_dir.begin_training()
                trackers.log(record)
                progress.update(self.step, {k: record[k] for k in (*progress_keys, "lr", "tokens_per_s")
                                            if k in record})
                # A signal may reach one rank only; every rank must stop (and save) at the same step: the end of a
                # round of sampled data, whose remaining steps a resume could not train as they would have been.
                if dist.all_reduce_sum(float(stop.requested)) > 0 and self._round_finished(source, stop):
                    path, resume = self.save(source), dist.resume_command(self.run_dir.path)
                    if main:
                        self.console.print(
                            f"[yellow]stopped by {stop.signal_name or 'a signal on another rank'} at step "
                            f"{self.step}[/]; checkpoint: {path}\nresume with: {resume}")
                    # (a rank whose process got no signal stops as a scheduler's SIGTERM would have stopped it)
                    stopped_by_signal = StoppedInTraining(stop.signum or signal.SIGTERM, self.step, str(path), resume)
                    break
                # The last step is always saved, so that a finished run can be continued with more steps.
                if self._due(self.train_cfg.save_every, final=True) or stopped_by is not None:
                    save_start = time.perf_counter()
                    self.save(source)
                    aside_s += time.perf_counter() - save_start
                if stopped_by is not None and main:
                    self.console.print(f"{self.stage}: stopped at step {self.step} of {self.train_cfg.max_steps} "
                                       f"by train.stop_when ({stopped_by})")
        trackers.close()
        seconds = time.perf_counter() - start
        if stopped_by_signal is not None:
            raise stopped_by_signal
        if main:
            shown = {k: last[k] for k in progress_keys if k in last}
            resumed = f" ({self.step - session_start} in this session)" if session_start else ""
            self.console.print(f"{self.stage}: {self.step} steps{resumed} in {seconds:.0f}s, {format_metrics(shown)}, "
                               f"{session_tokens / max(seconds, 1e-9):,.0f} tok/s, "
                               f"{self.skipped_steps} skipped steps")
        return TrainResult(step=self.step, last=last, tokens=self.tokens,
                           seconds=earlier_s + seconds, skipped_steps=self.skipped_steps, precision=self.precision,
                           device=str(self.device), stopped_by=stopped_by, processes=self.dist.world_size,
                           parallel=self.train_cfg.parallel)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's precision for a forward outside the loop (e.g. a reference pass before training)."""
        return autocast(self.precision, self.device)

    def _evaluate(self, evaluate: Evaluate, final: bool) -> dict[str, Any]:
        """Evaluation runs on rank 0 alone (its results are what gets logged); under FSDP every rank takes
        part in gathering the full weights first (and forgets the layers' forwards afterwards: `full_weights`).
        Without gradients: an evaluation has no use for the graph."""
        with self.parallel.full_weights(), self.autocast(), torch.no_grad():
            results = evaluate(self.step, final) if self.dist.is_main else {}
        dist.barrier()
        return results

    def _evaluates_early(self, evaluate: Evaluate | None) -> bool:
        """Whether the run evaluates before its last step (else a rule can read training metrics only)."""
        return evaluate is not None and 0 < self.train_cfg.eval_every < self.train_cfg.max_steps

    def _readable(self, rule: StopRule, record: dict[str, Any], evaluated: bool, evaluates: bool) -> StopRule | None:
        """`rule` if `record` (rank 0's, of a step with every metric the run logs before its last: an evaluation's
        step, `evaluated`, or the first step of a run that evaluates only at its last one, or never: `evaluates`)
        has its metric. A metric missing from an evaluation's record, or from a run without any evaluation, is
        refused; one that only the last step's evaluation could log (e.g. in a short trial of a recipe) cannot end
        the run early: said once, and the rule is dropped."""
        missing = self.dist.is_main and rule.metric not in record
        if dist.all_reduce_sum(float(missing)) == 0:
            return rule
        if evaluated or not evaluates:
            rule.refuse_unlogged(record, "its evaluations log" if evaluated else "it has no evaluation; its steps log")
        self._warn(f"train.stop_when ({rule}) cannot end this run early: it evaluates only at its last step "
                   f"(train.eval_every={self.train_cfg.eval_every}, train.max_steps={self.train_cfg.max_steps}) and "
                   f"its steps log {', '.join(sorted(record))}")
        return None

    def _stopped_by(self, rule: StopRule | None, record: dict[str, Any]) -> str | None:
        """The stopping rule with the value that met it when `record` (rank 0's) meets it, on every rank alike."""
        if rule is None:
            return None
        met = self.dist.is_main and rule.met(record)
        if dist.all_reduce_sum(float(met)) == 0:
            return None
        return rule.describe(record) if self.dist.is_main else f"{rule} (on rank 0)"

    def _round_finished(self, source: StepSource, stop: StopRequest) -> bool:
        """Whether a requested stop can happen now: at once, unless `source` is inside a round of sampled data
        (`steps_left_in_round`), whose steps are trained first (saying so once; a second Ctrl-C stops at once)."""
        left = getattr(source, "steps_left_in_round", lambda: 0)()
        if left == 0 or self.step >= self.train_cfg.max_steps:
            return True
        if self.dist.is_main and not stop.told:
            self.console.print(f"[yellow]stopping: first the {left} step(s) left of this round of samples[/] (so "
                               "that a resume trains on as the run would have); Ctrl-C again stops at once, without "
                               "a checkpoint of this round")
            stop.told = True
        return False

    def _warmup_note(self) -> str:
        """What a warm-up as long as the run does (optim.warmup_steps >= its steps): the lr never reaches optim.lr
        and no decay starts, which a user who set a short max_steps beside a recipe's warm-up does not expect."""
        warmup, steps = self.optim_cfg.warmup_steps, self.train_cfg.max_steps
        if warmup <= 0 or warmup < steps or self.optim_cfg.schedule_steps:  # a schedule set for a longer horizon
            return ""
        return (f"optim.warmup_steps={warmup} is not shorter than the run's {steps} steps: the learning rate rises to "
                f"{steps / warmup:.3g} x optim.lr at the last step and never decays (a shorter warm-up, or more "
                "train.max_steps)")

    def _due(self, every: int, final: bool) -> bool:
        at_end = final and self.step == self.train_cfg.max_steps
        return at_end or (every > 0 and self.step % every == 0)

    @contextlib.contextmanager
    def _out_of_memory_said(self, index: int, count: int) -> Iterator[None]:
        """A micro-batch's forward or backward that ran out of memory (a CUDA OOM; on a CPU, an allocation the
        system refused) is a one-line TrainingError naming the setting that bounds it, not a traceback from inside
        the model. (A process the kernel's OOM killer ends gets no word in: it dies with SIGKILL.)"""
        try:
            yield
        except (MemoryError, RuntimeError) as err:
            text = str(err)
            if not (isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
                    or "out of memory" in text.lower()):
                raise
            train = self.train_cfg
            raise TrainingError(
                f"out of memory in micro-batch {index + 1} of {count} of step {self.step + 1} ({type(err).__name__}: "
                f"{text.splitlines()[0][:200] if text else 'no detail'}): lower train.micro_batch_size (now "
                f"{train.micro_batch_size}; the optimizer step stays train.batch_size={train.batch_size}, in more "
                "micro-batches), or the RL stages' update.micro_batch_tokens, or the rows' length (data.max_length); "
                f"the run's checkpoints are in {self.run_dir.checkpoints}", field="train.micro_batch_size") from None

    def _optimizer_step(self, batch: StepBatch, loss_fn: LossFn) -> dict[str, Any]:
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        finite = True
        last = len(batch.micro_batches) - 1
        dist.same_on_all_ranks(len(batch.micro_batches), "the number of micro-batches in a step")
        for i, micro_batch in enumerate(batch.micro_batches):
            # Gradients are exchanged once per step, on the last micro-batch's backward.
            with self.parallel.step_context(sync=i == last), self._out_of_memory_said(i, last + 1):
                with self.autocast():  # the backward runs outside: each op in its forward's dtype
                    loss, micro_metrics = self.parallel.loss(loss_fn, micro_batch, batch.normaliser, sync=i == last)
                for key, value in micro_metrics.items():
                    sums[key] += value  # (a non-finite step logs NaN for each of them)
                if not torch.isfinite(loss):
                    finite = False
                    if not self.dist.distributed:
                        break
                # With several ranks every backward still runs (the others wait in its all-reduce); a
                # non-finite loss then makes the reduced gradient norm non-finite on every rank alike.
                loss.backward()
        grad_norm = math.nan
        if finite or self.dist.distributed:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
            grad_norm = dist.grad_norm_value(norm)
            finite = math.isfinite(grad_norm)
            limit = self.optim_cfg.grad_clip or math.inf
            # torch's clip_grad_norm_ scales every gradient by min(limit / (norm + 1e-6), 1): a pass over all of
            # them that multiplies by exactly 1 unless the norm is over the limit (on a CPU, ~1% of a small model's
            # bf16 step). It runs only then, with torch's coefficient: the same gradients, bitwise.
            if finite and dist.grad_norm_value(limit / (norm + 1e-6)) < 1.0:
                torch.nn.utils.clip_grads_with_norm_(self._params, limit, norm)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's (the scheduler's last, or a resume's configured)
        spike = finite and self._is_spike(grad_norm)
        if finite and not spike:
            before = self._weight_norm if self._weight_norm is not None else self._measure_weight_norm()
            self.optimizer.step()
            self._check_weight_growth(before, self._measure_weight_norm(), lr)
            self._nonfinite_in_a_row = 0
            if grad_norm > 0:  # a step with nothing to learn (e.g. every RL group tied) says nothing of the scale
                self._grad_norms.append(grad_norm)
        else:
            # Parameters and optimizer moments stay exactly as they were; the batch is consumed. Said at once: a
            # skipped step's rows go untrained (their epoch), and a run whose steps are skipped should be seen.
            if self.dist.is_main:
                why = (f"its gradient norm {grad_norm:.3g} is {grad_norm / statistics.median(self._grad_norms):.1f} "
                       f"x the median of the last {len(self._grad_norms)} trained steps' (train.spike_factor="
                       f"{self.train_cfg.spike_factor:g})" if spike else "a non-finite loss or gradient")
                self.console.print(f"[yellow]{self.stage}: step {self.step + 1} skipped[/]: {why}; its batch "
                                   "is left untrained and the weights are unchanged")
            self.skipped_steps += 1
            self._nonfinite_in_a_row += 1
            if self._first_skipped is None:
                self._first_skipped = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        if finite and not spike:
            self.scheduler.step()
        else:
            # Not around every step: a filter set and undone resets Python's once-per-place record of warnings, and
            # every library warning raised in a step came back at each step.
            with warnings.catch_warnings():
                # A first step skipped calls the scheduler before the optimizer ever stepped: torch warns that the
                # schedule's first value is skipped, which LambdaLR does not do.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()
        self.step += 1
        if finite and not spike:
            self.tokens += batch.tokens  # the trained steps' rows' tokens, prompts included (a skipped step's not)
        if self._nonfinite_in_a_row >= self.train_cfg.max_nonfinite:
            raise TrainingError(
                f"{self._nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient or a gradient-norm "
                f"spike (last at step {self.step}, the first skipped step was {self._first_skipped}); parameters "
                f"were left untouched. Lower {self._lr_settings} or check the data (or, if gradients this large are "
                f"expected, raise train.spike_factor={self.train_cfg.spike_factor:g}); the checkpoints (the newest one "
                f"from before step {self._first_skipped} is kept) are in {self.run_dir.checkpoints}",
                field="train.max_nonfinite")
        losses = dist.mean_over_ranks(sums)
        if not finite:  # what the step measured stops at its first non-finite micro-batch: none of it stands
            losses = dict.fromkeys(losses, math.nan)
        record = {"step": self.step, **losses, "lr": lr, "grad_norm": grad_norm,
                  "weight_norm": self._weight_norm, "skipped_steps": self.skipped_steps}
        if not finite:
            record["nonfinite"] = True
        if spike:
            record["spike"] = True
        return record

    def _measure_weight_norm(self) -> float:
        """The global norm of the trainable weights (under FSDP, of every rank's shards together)."""
        self._weight_norm = dist.grad_norm_value(torch.nn.utils.get_total_norm(
            [p.detach() for p in self._params]))
        return self._weight_norm

    def _check_weight_growth(self, before: float, after: float, lr: float) -> None:
        """Stop at an update that blew the weights up. A spike guard cannot see it when it is the run's first
        step (no window yet) and a finite one: it sees only the next step's gradient, by which time the weights
        are gone. Raised before the step is logged or saved, so every checkpoint holds weights from before it."""
        limit = self.train_cfg.max_weight_growth
        if limit <= 0 or before <= 0 or after <= limit * before and math.isfinite(after):
            return
        newest = latest_checkpoint(self.run_dir.checkpoints)
        kept = (f"the newest checkpoint, {newest}, holds the weights from before it" if newest is not None else
                "no checkpoint was written yet: the starting model is unchanged on disk")
        raise TrainingError(
            f"step {self.step + 1} multiplied the norm of the trainable weights by {after / before:.3g} ({before:.4g} "
            f"-> {after:.4g}; train.max_weight_growth={limit:g}): the learning rate {lr:g} is far too large. The "
            f"step was not saved; {kept}. Lower {self._lr_settings} and start again", field="optim.lr")

    def _is_spike(self, grad_norm: float) -> bool:
        """Whether a finite gradient norm is `spike_factor` times the median of the recent trained steps'.

        The gradient norm rather than the loss: it is positive in every stage, while RL and preference losses
        can sit near zero or below it, where a ratio means nothing. The median, unlike the mean, is not dragged
        up by the first spikes of a divergence; a window of zero norms (nothing to learn) never flags a step."""
        factor, window = self.train_cfg.spike_factor, self._grad_norms
        if factor <= 0 or len(window) < (window.maxlen or 0):
            return False
        median = statistics.median(window)
        return median > 0 and grad_norm > factor * median

    # ------------------------------------------------------------------------------------------

    def _state(self, source: StepSource) -> dict[str, Any]:
        stopped = {} if self._stopped is None else {"stopped_by_rule": list(self._stopped)}
        return {"tokens": self.tokens, "skipped_steps": self.skipped_steps, "elapsed_s": self.elapsed_s,
                "nonfinite_in_a_row": self._nonfinite_in_a_row, "grad_norms": list(self._grad_norms),
                "first_skipped": self._first_skipped, "data": source.state_dict(), **stopped,
                **self._model_files}

    def save(self, source: StepSource) -> Any:
        if self.dist.is_main and self.run_dir.metrics.is_file():
            # Its records reach the disk before the checkpoint does (checkpoints are synced; metrics only flushed to
            # the kernel): a power cut then cannot keep a checkpoint whose steps' records were lost.
            with self.run_dir.metrics.open("rb") as metrics:
                os.fsync(metrics.fileno())
        if self.dist.distributed:
            return save_sharded_checkpoint(
                self.run_dir.checkpoints, self.step, model=self.parallel, optimizer=self.optimizer,
                scheduler=self.scheduler, trainer_state=self._state(source),
                config_text=config_text(self.stage, self.cfg), keep_last=self.train_cfg.keep_last,
                keep_before=self._first_skipped)
        return save_checkpoint(
            self.run_dir.checkpoints, self.step, modules={"model": self.model},
            optimizers={"model": self.optimizer}, schedulers={"model": self.scheduler},
            tokenizer=self.tokenizer, trainer_state=self._state(source), config_text=config_text(self.stage, self.cfg),
            keep_last=self.train_cfg.keep_last, keep_before=self._first_skipped)

    def _keep_the_steps_before_a_failed_one(self, source_state: dict[str, Any] | None) -> None:
        """A step's data failed to come (a reward function that breaks from some round on, a grader's service gone,
        a rejection round that kept nothing): save the steps trained so far, with the data walk as it was before the
        failed step, so that a resume (once the cause is fixed) trains that step again instead of every step since
        the last periodic checkpoint. The model and optimizer are those of the last finished step: the failure came
        before this step's update. Not before the first step (the run is undone), not when that step's checkpoint
        exists, and not across processes (a failure on one rank would leave the others in a collective save)."""
        if source_state is None or self.step == 0:
            return
        latest = latest_checkpoint(self.run_dir.checkpoints)
        if latest is not None and latest.name == f"step-{self.step}":
            return
        try:
            path = self.save(_Snapshot(source_state))
        except Exception as error:  # the failure the user is about to see is the one that matters
            self._warn(f"the {self.step} steps trained before the failure could not be saved: {error}")
            return
        if self.dist.is_main:
            self.console.print(f"{self.stage}: step {self.step + 1} failed; the {self.step} steps before it are saved "
                               f"({path}): once its cause is mended, `{dist.resume_command(self.run_dir.path)}` "
                               "trains on from there")

    def _kept_settings(self) -> dict[str, Any]:
        """This run's values of the settings a resume must keep (`checkpoint.KEPT_ON_RESUME`) that its config has."""
        flat = {"run.seed": self.run.seed}
        config = to_dict(self.cfg) if dataclasses.is_dataclass(self.cfg) else {}
        for key in KEPT_ON_RESUME:
            section, _, name = key.partition(".")
            if isinstance(config.get(section), Mapping) and name in config[section]:
                flat[key] = config[section][name]
        return flat

    def _maybe_resume(self, source: StepSource) -> Any:
        if not self.run.resume:
            return None
        path = resume_checkpoint(self.run_dir.checkpoints, self._warn, move_aside=self.dist.is_main)
        if path is None:  # never retrain a run from step 0 on top of its own metrics and final model
            raise RunDirError("run.resume=true but there is no complete checkpoint to resume from",
                              file=str(self.run_dir.checkpoints))
        configured = [{key: group[key] for key in RESUMED_SETTINGS if key in group}
                      for group in self.optimizer.param_groups]
        try:
            check_world_size(path, self.dist.world_size)
            check_kept_settings(path, self._kept_settings(), self._warn)
            if self.dist.distributed:
                state = load_sharded_checkpoint(path, model=self.parallel, optimizer=self.optimizer,
                                                scheduler=self.scheduler)
            else:
                state = load_checkpoint(path, modules={"model": self.model}, optimizers={"model": self.optimizer},
                                        schedulers={"model": self.scheduler})
            source.load_state_dict(state["data"])
        except (RunDirError, ConfigError):
            # The run's config.yaml already holds this attempt's settings, which do not fit the checkpoint: put
            # back the checkpoint's own, so that a plain `posttrain resume` of the directory still works.
            if self.dist.is_main and (path / "config.yaml").is_file():
                self.run_dir.write_config((path / "config.yaml").read_text(encoding="utf-8"))
            raise
        self._keep_configured_settings(configured)
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.elapsed_s = state.get("elapsed_s", 0.0)  # checkpoints from before it was kept: this session's only
        self.skipped_steps = state["skipped_steps"]
        self._nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self._grad_norms.extend(state.get("grad_norms", []))  # checkpoints from before the spike guard lack both
        self._first_skipped = state.get("first_skipped")
        # The same files (checked): kept as first read
        self._model_files.update({name: state[name] for name in MODEL_PATHS.values() if name in state})
        stopped = state.get("stopped_by_rule")  # [the rule, with the value that met it]
        self._stopped = (stopped[0], stopped[1]) if stopped else None
        if self.dist.is_main:
            kept = truncate_metrics(self.run_dir.metrics, self.step)
            truncate_samples(self.run_dir.samples, self.step)
            truncate_metrics(self.run_dir.reward_errors, self.step)  # the reward errors of steps trained again
            self._resumed_last = kept[-1] if kept and kept[-1].get("step") == self.step else {}
            # Every step logs a record; a file deleted, or a tail a power cut took (metrics are flushed, not synced
            # to disk, while checkpoints are), left a hole in the curves nothing mentioned.
            logged = {record.get("step") for record in kept}
            missing = [step for step in range(1, self.step + 1) if step not in logged]
            if missing:
                self._warn(f"{self.run_dir.metrics.name} has no record of {len(missing)} of the {self.step} steps "
                           f"trained before this resume ({_spans(missing)}): their curves have a hole there")
        return path

    def _keep_configured_settings(self, configured: list[dict[str, Any]]) -> None:
        """The learning rates (and weight decay, betas) of this run's config, not the checkpoint's: loading the
        optimizer's and scheduler's state brings back the values they were saved with, while config.yaml records the
        new ones, and a lower optim.lr is how a diverged run is resumed. The schedule's position is the checkpoint's:
        lr = the configured peak x the schedule's factor at the resumed step. Unchanged settings are left as loaded
        (a plain resume stays bitwise)."""
        changed = []
        for index, (group, settings) in enumerate(zip(self.optimizer.param_groups, configured, strict=True)):
            moved = {key: value for key, value in settings.items() if group.get(key) != value}
            changed += [f"{key} {group.get(key)} -> {value}" for key, value in moved.items()]
            group.update(moved)
            self.scheduler.base_lrs[index] = group["initial_lr"]
            # The configured schedule's lr at the resumed step, also when only the schedule changed (max_steps,
            # warmup_steps, schedule): the loaded lr was the old schedule's, for the first resumed step alone.
            scheduled = group["initial_lr"] * self.scheduler.lr_lambdas[index](self.scheduler.last_epoch)
            if scheduled != group["lr"]:
                if not moved:
                    changed.append(f"lr at step {self.scheduler.last_epoch + 1} {group['lr']:g} -> {scheduled:g} "
                                   "(the schedule's settings)")
                group["lr"] = scheduled
        if changed:  # once per change: parameter groups that differ only in weight decay change alike
            self._warn("resumed with the config's optimizer settings, not the checkpoint's: "
                       f"{'; '.join(dict.fromkeys(changed))}")

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            self.console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _spans(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> 'steps 1-3, 7'."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return "steps " + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


# What a resumed run takes from its config rather than from the checkpoint's optimizer state (`_maybe_resume`).
RESUMED_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps")


class _NoMetrics:
    """What ranks other than 0 log metrics to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> _NoMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
