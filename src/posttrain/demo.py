"""`posttrain demo`: the whole pipeline on the built-in model and tasks, offline, on a CPU.

Each stage is a shipped recipe run into `<out>/<stage name>/`, reading the final model of the stage it builds
on. A stage whose final model already exists is reused unless `fresh` (so an interrupted demo picks up where it
stopped), if it ran with this demo's settings from the base model there now. `demo.json` collects every stage's
summary, those of stages whose base ran again after them left out.

Stages that do not build on each other run at the same time (`jobs`, by default one per core up to 4), each in
its own process with its share of the cores and its log in `<out>/logs/`; the pretraining, which everything
builds on, runs alone with every core. A small model's steps are many small operations that one thread runs
nearly as fast as two, so on 2 cores two stages at once finish more work per minute than one at a time.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from posttrain import recipes
from posttrain.console import run_console
from posttrain.errors import ConfigError, RunDirError
from posttrain.eval.demo_report import reward_model_result, write_demo_report
from posttrain.eval.evaluate import EvalOptions, evaluate
from posttrain.train.metrics import finite_json
from posttrain.train.run_dir import hold_run_lock
from posttrain.train.seed import threads_for
from posttrain.train.signals import (
    Interrupted,
    StoppedInTraining,
    interrupt_on_signals,
    on_stop_signals,
    stop_when_demo_dies,
)


class DemoStopped(Exception):
    """A stage was stopped by a signal inside its training loop (it saved a checkpoint and said so)."""


class DemoStageFailed(Exception):
    """A stage run in a child process of a parallel demo exited with an error (its log says which)."""


MAX_JOBS = 4  # stages run at once by default (at most 8 are ready at once, and each holds a model and its data)
DEMO_PID_VARIABLE = "POSTTRAIN_DEMO_PID"  # tells a parallel demo's stage which process started it
# What every stage's process imports (torch, transformers, datasets, matplotlib: 7-9 s a process on these CPUs),
# imported once by the fork server that forks the stages.
STAGE_IMPORTS = ("posttrain.cli", "posttrain.demo", "posttrain.eval.evaluate", "posttrain.eval.report",
                 "matplotlib.figure", "matplotlib.backends.backend_agg",  # a stage's report only (`eval.plotting`)
                 *(f"posttrain.recipes.{name}" for name in ("rl_loop", "pretrain", "sft", "rm", "dpo", "grpo", "ppo",
                                                             "rft", "rejection")))
STATUS_EVERY_S = 30.0  # a parallel demo's line of what runs and how far it is


@dataclass(frozen=True)
class DemoStage:
    name: str
    stage: str
    builds_on: str | None
    headline: Callable[[dict[str, Any]], str]
    recipe: str | None = None  # a shipped recipe other than the stage's own
    overrides: tuple[str, ...] = ()  # settings of this demo stage on top of the recipe (and its quick budgets)
    budget: tuple[str, ...] = ()  # budget settings of the full demo only (--quick keeps the recipe's quick ones)
    task: str = "arith"  # the task its held-out accuracy is measured on
    samples: int = 8  # completions per held-out problem at temperature 1 in its sampled evaluation (--quick: at most 2)
    alone: bool = False  # runs by itself with every core (every other stage waits for it), never beside another
    critical: bool = False  # on the demo's longest chain of stages: starts before the other ready ones

    @property
    def is_policy(self) -> bool:
        """Whether the stage trains a policy that generates (not the pretraining or a reward model)."""
        return self.stage not in ("pretrain", "rm")


def _pretrain_headline(summary: dict[str, Any]) -> str:
    return f"held-out loss {summary['initial_eval_loss']:.2f} -> {summary['final_eval_loss']:.2f}"


def _accuracy_headline(summary: dict[str, Any]) -> str:
    low, high = summary["accuracy_ci"]
    before = f"{summary['accuracy_before']:.1%} -> " if "accuracy_before" in summary else ""
    return f"held-out exact match {before}{summary['accuracy']:.1%} (95% CI {low:.1%}-{high:.1%})"


def _steps_headline(summary: dict[str, Any]) -> str:
    """Final-answer and per-step accuracy before -> after, for tasks solved in steps."""
    before = (f"{summary['accuracy_before']:.1%} -> " if "accuracy_before" in summary else "")
    steps_before = (f"{summary['step_accuracy_before']:.1%} -> " if "step_accuracy_before" in summary else "")
    return (f"held-out final answer {before}{summary['accuracy']:.1%}, "
            f"steps right {steps_before}{summary.get('step_accuracy', float('nan')):.1%}")


def _reward_model_headline(summary: dict[str, Any]) -> str:
    return f"held-out {reward_model_result(summary)}, mean margin {summary['eval_margin']:.2f}"


# The post-training task: `chain` ("What is 23+17-9?"), whose SFT rows answer three in five directly and two in
# five in two worked steps. The model samples both ways; the worked one is right far more often, and that is a
# behaviour shared by every problem: RL learns it from the final answer's reward, and it transfers to held-out problems
# (on arith, each a∘b is a separate fact and RL's gains did not transfer: README, "What the demo shows").
CHAIN = ("data.source=chain", "eval.task=chain", "eval.max_new_tokens=24")
SAMPLED = (*CHAIN, "sampling.max_new_tokens=24")
# The multistep stages are scored on 1000 held-out problems, not 500: process - outcome steps right is a difference
# of ~2 points with a paired SD of ~21 per problem (three draws, Intel Xeon), which 500 problems resolve about half
# the time (844 give 80% power for +2). Their sampled evaluation draws 1 completion per problem (1000 in all): their
# comparison is steps right, from greedy decoding; 8 samples of up to 96 tokens took about 70 s of each stage on the
# Intel Xeon, and the second of 2 took 12.5 s of each on the Zen 4 EPYC, where the demo is at its 15 minutes (with
# one, pass@k is pass@1 and no share of problems whose samples disagree is reported).
MULTISTEP_PROBLEMS = ("eval.problems=1000",)
MULTISTEP_SAMPLES = 1
# Chains of 4-5 operations: where process supervision pays. On the 2-5-step chains of `multistep` process - outcome
# steps right stayed inside the noise in every setting tried (+0.4 to +1.8, 500 problems; README), the gap all in the
# 5-step chains (+3.4 to +7.2). On 4-5-step chains, three draws on the Intel Xeon (the same pretrained model): +3.0
# (+1.4 to +4.7), +1.5 (-0.3 to +3.3) and +2.4 (+0.6 to +4.3), the 5-step chains +3.1 to +4.4, both GRPO modes +7
# to +11 final answers.
MULTISTEP_TASK = "multistep-long"
MULTISTEP = (f"data.source={MULTISTEP_TASK}", f"eval.task={MULTISTEP_TASK}")
# The multistep GRPO stages at lr 5e-5, not the grpo-process recipe's 3e-5 (chosen from a 400-step SFT model, where
# 5e-5 cost final answers): from the demo's mid-transition SFT model, on 1000 held-out problems of another draw
# than the demo's, process - outcome steps right was +2.5 (+1.3 to +3.7) at 3e-5 and +4.3 (+2.9 to +5.8) at 5e-5
# (+5.8, +4.2 to +7.4, with run.seed=1), with final answers +11.5 (process) and +8.9 (outcome) over the SFT model at
# 5e-5. The demo at 04c69e3, on its own problems: +4.1 (+2.7 to +5.6), 5-step chains +8.4, 4-step -0.2.
# 100 steps, not the recipe's 120: on the Zen 4 EPYC, from the demo's multistep SFT model (45.0% of steps right),
# process - outcome steps right was +4.3 (+3.1 to +5.4) and +3.4 (+2.2 to +4.5) at 100 steps (run.seed 0 and 1)
# against +3.5 (+2.4 to +4.6) and +3.3 (+2.0 to +4.5) at 120, and +1.0 (-0.1 to +2.2) at 80; the 40 steps saved
# are ~30 s of the demo on that CPU, where it ran at its 15 minutes.
MULTISTEP_GRPO = (*MULTISTEP_PROBLEMS, "optim.lr=5e-5", "train.max_steps=100")
ROUNDS_OF_256 = ("update.rollout_batch_size=256", "train.batch_size=128", "train.micro_batch_size=128")
GRPO_STEPS = ("train.max_steps=20",)  # GRPO and its control on a coin: the same compute

STAGES = [
    # fp32 throughout. Pretraining in bf16 (train.precision=auto on the Intel Xeon with AMX) ran its steps 1.5x
    # faster but ended at a held-out loss of 0.938 against fp32's 0.907, and the SFT model on it reached 42.8% of
    # chain problems against 68.8% (one run each, 2026-12-03): not worth the 90 s it saves.
    DemoStage("pretrain", "pretrain", None, _pretrain_headline, alone=True),
    DemoStage("sft", "sft", "pretrain", _accuracy_headline, overrides=CHAIN, task="chain"),
    # The reward model judges what a policy samples: pairs of the SFT model's own samples (a right and a wrong one of
    # a prompt, pairs.source=on_policy), the reward read from the SFT model's likelihood of the answer
    # (head=likelihood). Intel Xeon, its SFT model 68.8%, the 400 pairs of 500 held-out prompts: the likelihood
    # ranks 90.7% untrained, 92.5% after 25 Bradley-Terry steps and 92.2% after 50 (1024 prompts, reward_scale 0.2,
    # lr 1e-5); 2048 prompts 92.5% at 50 steps, 91.2% at 100; scale 1 90.0%, lr 3e-5 90.2% (100 steps). A scalar
    # head on the last token reached 71.0% on the task's near-miss pairs (500 steps) and 74.7-78.7% on sampled
    # pairs (AMD EPYC): it has to re-derive the answer at that one position. Those figures are of the half-and-half
    # chain rows; with two in five worked (an SFT model of 41.6%) 86.4%, since a right direct answer is luck the
    # likelihood cannot tell from a wrong one (lr 1e-5 to 1e-4, 10 to 100 steps, up to 4096 prompts: 82.4-85.3% at 35%).
    # The mean logprob per token instead of the sum (reward_reduction=mean): a right worked answer is not charged for
    # its length against a wrong direct one. Over the sum, on each CPU's own demo pairs: +2.5 untrained on the Intel
    # Xeon (88.7% against 86.2%), +3.4 untrained on an AVX2-only AMD EPYC (84.6% against 81.2%), +3.4 trained on the
    # Zen 4 EPYC (84.9% against 81.5%, paired +0.3 to +6.4; scale 1 84.6%, lr 3e-5 82.7%, 100 steps 83.4%).
    DemoStage("rm", "rm", "sft", _reward_model_headline,
              overrides=("data.source=chain", "head=likelihood", "reward_scale=0.2", "reward_reduction=mean",
                         "pairs.source=on_policy",
                         "sampling.max_new_tokens=24", "optim.lr=1e-5", "optim.warmup_steps=0", "data.size=256",
                         "eval.size=64"),
              budget=("data.size=1024", "eval.size=640", "train.max_steps=50"), task="chain"),
    # DPO on pairs of the policy's own samples (a correct and an incorrect answer of one prompt), resampled every
    # 25 steps, 512 prompts a round, at 3e-5 (greedy in 100 steps: +5.2; 256 prompts: +4.2, at 5e-5 +2.8, at 1e-4
    # -0.8, 150 steps +3.0; beta 0.3 +3.2; without the NLL term -0.4). The
    # task's offline pairs (a right and a near-miss answer, in either way of answering) taught the direct answer
    # and cost 46 points of greedy accuracy.
    DemoStage("dpo", "dpo", "sft", _accuracy_headline,
              overrides=(*SAMPLED, "pairs.source=on_policy", "pairs.prompts_per_round=64"),
              budget=("pairs.prompts_per_round=512", "pairs.resample_every=25", "train.max_steps=100", "optim.lr=3e-5"),
              task="chain"),
    # PPO and RFT on rounds of 256 completions in 2 minibatches (the recipes' 128 in 2 gained +1.8 and +0.6 greedy
    # here: too few samples per step for this task), rejection sampling on 1024 prompts per round (512: +3.6).
    # PPO in 8 rounds (32 steps), half the recipe's: its training reward levels off by step 45 of 60, and from the
    # demo's SFT model of 1ae6dc4 (42.2%) 30 steps gained +16.4 greedy (+12.2 to +20.6) and +17.7 sampled against
    # 60 steps' +20.8 and +26.8, in 98 s instead of 160 (Intel Xeon, one thread). Both train their critic at its own
    # lr (the recipes' critic.lr, 1e-3): at the policy's 3e-5 it explained none of the returns' variance in these
    # steps, and PPO's sampled gain was +9.7 (AMD EPYC Zen 4), +15.4 with it (recipes/configs/ppo.yaml).
    DemoStage("ppo", "ppo", "sft", _accuracy_headline, overrides=SAMPLED,
              budget=(*ROUNDS_OF_256, "train.max_steps=32"), task="chain"),
    # Dynamic sampling: 40 steps with it gain what 80 without do (greedy 69.0% -> 74.4% vs 74.6%) in 34 s, not 47.
    # 20 steps, half the recipe's: from the same SFT model +19.2 greedy (+15.2 to +23.2) and +23.7 sampled against
    # 40 steps' +19.4 and +30.1, in 80 s instead of 121 (the training reward levels off by step 20).
    DemoStage("grpo", "grpo", "sft", _accuracy_headline, overrides=(*SAMPLED, "filter.enabled=true"),
              budget=GRPO_STEPS, task="chain"),
    # The two controls of GRPO: the same run on a coin instead of the reward, and continued SFT on the gold
    # answers for about GRPO's time (a step count, so that it reproduces on any machine).
    DemoStage("grpo-coin", "grpo", "sft", _accuracy_headline,
              overrides=(*SAMPLED, "filter.enabled=true", "reward.functions={coin: 1.0}"), budget=GRPO_STEPS,
              task="chain"),
    DemoStage("sft-more", "sft", "sft", _accuracy_headline, overrides=(*CHAIN, "optim.warmup_steps=0"),
              budget=("train.max_steps=150",), task="chain"),
    # Process against outcome supervision on multistep chains: one SFT on the chain format, then the same
    # GRPO recipe and budget with per-step rewards and with the final answer's reward only. The three are the demo's
    # longest chain of stages (critical: each starts before any other ready stage).
    # The SFT model learns to look the next operation up in a sudden transition, whose step depends on the CPU and
    # its GEMM library (their float sums) and on the seed: at lr 2e-3 on a 400-step cosine schedule, steps right at
    # step 250 were 68% on the Intel Xeon, 65% on an AVX2-only AMD EPYC, 76% on a Zen 4 EPYC with oneDNN's GEMMs
    # and 36.5% on the same EPYC with MKL's (45/55/62% at steps 300/350/400). GRPO has the most left to teach
    # mid-transition (on 2-5-step chains, from the Xeon's 250-step model at 67.9%, both GRPO modes gained +8.4 and
    # +8.6 points of final answers, against +0.0 / +1.2 from its 400-step model at 91.4%), so the stage stops on
    # the transition, not at a fixed step: at the first check, every 20 steps, where a dev draw of 200 problems
    # (none of the 1000 it is scored on) has 45% of its steps right, at step 400 at the latest (a check costs
    # ~1.5 s). At lr 3e-3 the transition comes sooner: on the Zen 4 EPYC with MKL, steps right at steps
    # 200/250/275/300 were 30/48/53/59% (seed 0) and 29/39/47/57% (seed 1) on 300 problems of another draw, where
    # 2e-3 had 29/37/-/45%; a threshold of 50% stopped it at step 300 there, and 7.4 minutes of multistep SFT
    # would have put that CPU's demo past 15 minutes.
    DemoStage("sft-multistep", "sft", "pretrain", _accuracy_headline,
              overrides=(*MULTISTEP, "eval.max_new_tokens=48", "optim.lr=3e-3", "train.max_steps=15",
                         "eval_before=false"),
              # no evaluation before: the pretrained model does not know the format (0.0% of 500 in the demo of
              # 2026-12-02), and its answers that run on to the token limit cost 28 s to measure
              # --quick: 15 steps and 48 new tokens (wiring only: a barely trained model runs on to the limit), as the
              # grpo-process recipe's quick budget does; 5 labelled steps and the answer take up to ~80
              budget=("train.max_steps=400", "train.eval_every=20", "train.stop_when=dev_step_accuracy >= 0.45",
                      "eval.dev_problems=200", "eval.max_new_tokens=96", *MULTISTEP_PROBLEMS),
              task=MULTISTEP_TASK, samples=MULTISTEP_SAMPLES, critical=True),
    DemoStage("grpo-process", "grpo", "sft-multistep", _steps_headline, recipe="grpo-process", overrides=MULTISTEP,
              budget=MULTISTEP_GRPO, task=MULTISTEP_TASK, samples=MULTISTEP_SAMPLES, critical=True),
    DemoStage("grpo-outcome", "grpo", "sft-multistep", _steps_headline, recipe="grpo-process",
              overrides=(*MULTISTEP, "advantage.supervision=outcome"), budget=MULTISTEP_GRPO, task=MULTISTEP_TASK,
              samples=MULTISTEP_SAMPLES, critical=True),
    DemoStage("rft", "rft", "sft", _accuracy_headline, overrides=SAMPLED, budget=ROUNDS_OF_256, task="chain"),
    DemoStage("rejection", "rejection", "sft", _accuracy_headline, overrides=SAMPLED,
              budget=("prompts_per_round=1024",), task="chain"),
]


def _sampled_eval(stage: DemoStage, run_dir: Path, summary: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Sampled accuracy, pass@k, headroom per category, per-problem results and KL to the model the stage started
    from, on the held-out problems the stage was scored on: what the report's gains, headroom and reward-vs-KL
    need. The greedy results per problem are the recipe's own final evaluation's (recorded in the run), not
    decoded again."""
    if not stage.is_policy:
        return {}
    samples = min(2, stage.samples) if quick else stage.samples
    # 256 completions per generation call: 64 (the CLI's default) cost 10-20% more here
    options = EvalOptions(task=stage.task, problems=summary.get("eval_problems") or 500, samples=samples,
                          pass_k=(1, samples), rewards=("correct",), batch_size=256, reuse_recorded=True)
    sampled = evaluate(run_dir, options, write=False)
    measured = {"sampled_reward": sampled["reward_correct"], "headroom": sampled["categories"],
                "sampled_accuracy": sampled["sampled_accuracy"], "per_problem": sampled["per_problem"],
                "samples_per_problem": samples,
                **{k: v for k, v in sampled.items() if k.startswith("pass@")}}
    if _builds_on_policy(stage):  # SFT's KL to the pretrained model says nothing about the post-training stages
        measured["kl_to_base"] = sampled.get("kl")
    return measured


def _builds_on_policy(stage: DemoStage) -> bool:
    """Whether a stage post-trains a policy (an SFT model), not the pretrained model."""
    base = next((s for s in STAGES if s.name == stage.builds_on), None)
    return base is not None and base.is_policy


def _measured_before(stage: DemoStage, summaries: dict[str, dict[str, Any]], problems: int | None) -> dict[str, Any]:
    """The accuracy of the model a post-training stage starts from, as its base stage measured it at the end
    (the same task, seed and held-out problems: the first N distinct ones), or {} when it has to be measured (also
    when the base was scored on another number of problems than the stage's `problems`: --quick budgets differ)."""
    base = summaries.get(stage.builds_on or "", {})
    if (not stage.is_policy or not _builds_on_policy(stage) or base.get("accuracy") is None
            or base.get("eval_problems") != problems):
        return {}
    before = {"accuracy_before": base["accuracy"]}
    if base.get("step_accuracy") is not None:
        before["step_accuracy_before"] = base["step_accuracy"]
    return before


def usable_cores() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(cores: int) -> int:
    """Stages run at once by default: one per core, at most MAX_JOBS (no more stages are ready at once)."""
    return max(1, min(MAX_JOBS, cores))


def stage_threads(stage: DemoStage, jobs: int, cores: int) -> int:
    """The torch threads of a stage: a stage that runs alone gets every core, the others an equal share.

    A function of the stage, `jobs` and the cores only, never of what else happens to run, because a stage's
    numbers depend on its thread count (the float sums split differently): `--stages X --fresh` then reproduces
    what the whole demo gave X on the same machine with the same `--jobs`."""
    return cores if stage.alone or jobs == 1 else max(1, cores // jobs)


def run_demo(out: str = "runs/demo", quick: bool = False, fresh: bool = False, stages: list[str] | None = None,
             console: Console | None = None, jobs: int = 0, threads: int = 0,
             stage_summary: str | None = None) -> dict[str, dict[str, Any]]:
    """Run the wanted stages (all by default) that have not finished yet, or all of them if `fresh`.

    jobs: stages run at once, each in its own process (0: `default_jobs`; 1: one after the other, in this
    process). threads: every stage's torch threads (0: `stage_threads`). stage_summary: write the one wanted
    stage's summary to this file instead of demo.json and the report (how a parallel demo runs a stage).
    """
    console = console or run_console()
    out_dir = Path(out)
    wanted = stages or [s.name for s in STAGES]
    unknown = sorted(set(wanted) - {s.name for s in STAGES})
    if unknown:
        raise ConfigError(f"unknown demo stage(s) {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}",
                          field="--stages")
    if jobs < 0 or threads < 0:
        raise ConfigError(f"must be >= 0 (0 = auto), got {jobs if jobs < 0 else threads}",
                          field="--jobs" if jobs < 0 else "--threads")
    if stage_summary:  # a stage of a parallel demo: it must not train on, unseen, once the demo has died
        stop_when_demo_dies(DEMO_PID_VARIABLE)
    if not stage_summary:  # two demos in one directory would each rewrite demo.json without the other's stages
        hold_run_lock(out_dir, "a demo in this directory")
    summaries = _load_summaries(out_dir, fresh)
    if not stage_summary and summaries != _consistent(summaries):
        _write_summaries(out_dir, summaries, console)
    todo: list[DemoStage] = []
    for stage in STAGES:  # bases first: a stage whose base runs again runs again too
        if stage.name in wanted and (fresh or stage.builds_on in {t.name for t in todo}
                                     or not _finished(stage, out_dir, summaries, quick)):
            todo.append(stage)
            settings = summaries.get(stage.name, {}).get("demo_settings", "none")
            if not (fresh or stage_summary) and stage.name in summaries and settings != _settings(stage, quick):
                console.print(f"{stage.name} runs again: its results are from other settings (a "
                              f"{'full' if quick else '--quick'} demo, other budgets, or an older posttrain)",
                              highlight=False)
    _check_bases(todo, out_dir, summaries)
    cores = usable_cores()
    jobs = jobs or default_jobs(cores)
    threads_of = {s.name: threads or stage_threads(s, jobs, cores) for s in todo}
    started = time.perf_counter()
    try:
        if jobs == 1 or len(todo) <= 1:
            for stage in todo:
                console.rule(f"[bold]{stage.name} ({threads_of[stage.name]} thread(s))")
                summaries[stage.name] = _run_stage(stage, out_dir, quick, summaries, threads_of[stage.name])
                if stage_summary:
                    _write_json(Path(stage_summary), summaries[stage.name])
                else:
                    _write_summaries(out_dir, summaries, console)
        else:
            _run_in_parallel(todo, out_dir, quick, summaries, jobs, threads_of, console)
    finally:
        console.print(_table(wanted, {s.name for s in todo}, summaries, out_dir, quick))
    if stage_summary:
        return summaries
    minutes = (time.perf_counter() - started) / 60
    # up to: a stage waits for the one it builds on, so fewer may have run side by side
    side_by_side = "one at a time" if jobs == 1 or len(todo) <= 1 else f"up to {jobs} at once"
    console.print(f"{len(todo)} stage(s) in {minutes:.1f} min, {side_by_side} on {cores} core(s)")
    if summaries:
        report = write_demo_report(out_dir, {s.name: s.builds_on for s in STAGES}, {s.name: s.task for s in STAGES})
        console.print(f"Report with plots: [bold]{report}[/]")
    console.print(f"Every stage's run directory (metrics.jsonl, report.md, plots/, final/) is under "
                  f"[bold]{out_dir}[/]; final/ directories load with transformers' from_pretrained.")
    return summaries


def _load_summaries(out_dir: Path, fresh: bool) -> dict[str, dict[str, Any]]:
    """demo.json's summaries of the stages done. A damaged one cannot say which are: refused, unless the demo runs
    every stage again anyway (--fresh), which writes it anew."""
    summary_file = out_dir / "demo.json"
    if not summary_file.is_file():
        return {}
    try:
        summaries = json.loads(summary_file.read_text(encoding="utf-8"))
        if not isinstance(summaries, dict) or not all(isinstance(v, dict) for v in summaries.values()):
            raise ValueError(f"not an object of each stage's summary: {type(summaries).__name__}")
    except ValueError as err:
        if fresh:
            return {}
        raise RunDirError(f"is damaged ({err}): which stages are done is unknown; run the demo with --fresh to run "
                          "them again", file=str(summary_file), line=getattr(err, "lineno", None)) from None
    return summaries


def _settings(stage: DemoStage, quick: bool) -> dict[str, Any]:
    """What a stage's results were trained under, beyond its recipe: a quick demo's are not a full demo's."""
    return {"quick": quick, "overrides": [*stage.overrides, *(() if quick else stage.budget)]}


def _finished(stage: DemoStage, out_dir: Path, summaries: dict[str, dict[str, Any]], quick: bool) -> bool:
    """A stage is done when its final model and summary exist and it ran with the settings this demo would give it
    (that it started from its base's model now is `_consistent`'s: `run_demo` drops the summaries that did not)."""
    summary = summaries.get(stage.name)
    # Its run's summary.json too, written last: a rerun stopped in its final export leaves demo.json's entry of the
    # run before it beside a final/ half-written.
    return ((out_dir / stage.name / "final").is_dir() and (out_dir / stage.name / "summary.json").is_file()
            and summary is not None and summary.get("demo_settings") == _settings(stage, quick))


def _consistent(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The summaries of stages trained from the model their base stage holds now: a stage whose base ran again after
    it (`posttrain demo --stages sft --fresh`, or a stopped rerun) is left out, so the report never compares it with a
    base it did not start from; the next demo runs it anew."""
    kept: dict[str, dict[str, Any]] = {}
    for stage in STAGES:  # bases first
        summary = summaries.get(stage.name)
        if summary is None:
            continue
        if stage.builds_on is None or (stage.builds_on in kept and summary.get("base_finished_at")
                                       == kept[stage.builds_on].get("finished_at")):
            kept[stage.name] = summary
    return kept


def _write_summaries(out_dir: Path, summaries: dict[str, dict[str, Any]], console: Console) -> None:
    """demo.json from the consistent summaries (`_consistent`); a stage left out is named, and dropped from
    `summaries` too."""
    kept = _consistent(summaries)
    for name in [n for n in summaries if n not in kept]:
        console.print(f"[yellow]{name}'s results are dropped: the stage it builds on ran again after it; "
                      f"`posttrain demo` runs it anew[/]", highlight=False)
        del summaries[name]
    _write_json(out_dir / "demo.json", _in_stage_order(kept))


def _check_bases(todo: list[DemoStage], out_dir: Path, summaries: dict[str, dict[str, Any]]) -> None:
    """Every stage to run builds on a finished stage with its results in demo.json, or on one that runs before it:
    checked before anything runs."""
    names = {s.name for s in todo}
    for stage in todo:
        base = stage.builds_on
        if not base or base in names:  # a base that runs first is there when the stage starts
            continue
        if not (out_dir / base / "final").is_dir():
            raise ConfigError(f"stage {stage.name!r} builds on {base!r}, which has not run yet "
                              f"(no {out_dir / base / 'final'})", field="--stages")
        if base not in summaries:
            # its model is there, but not the results it was trained with (dropped: its own base ran again after
            # it; or demo.json is an older posttrain's): what this stage's report would compare with is unknown
            raise ConfigError(f"stage {stage.name!r} builds on {base!r}, whose results are not in "
                              f"{out_dir / 'demo.json'} (the stage it builds on ran again after it, or an older "
                              f"posttrain ran it): run both, --stages {base},{stage.name}", field="--stages")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a parallel stage reads demo.json while another one's summary is merged in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(finite_json(data, indent=2))
    os.replace(partial, path)


def _in_stage_order(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    order = {s.name: i for i, s in enumerate(STAGES)}
    return dict(sorted(summaries.items(), key=lambda item: order.get(item[0], len(order))))


def _run_stage(stage: DemoStage, out_dir: Path, quick: bool, summaries: dict[str, dict[str, Any]],
               threads: int) -> dict[str, Any]:
    """Run one stage's recipe in this process; its summary with the demo's own measurements."""
    overrides = [*stage.overrides, *(() if quick else stage.budget), f"run.out_dir={out_dir}",
                 f"run.name={stage.name}", "run.overwrite=true", f"run.threads={threads}"]
    if stage.builds_on:
        overrides.append(f"model.path={out_dir / stage.builds_on / 'final'}")
    configured = recipes.build_config(recipes.find_recipe(stage.recipe or stage.stage), overrides, quick)
    before = _measured_before(stage, summaries, getattr(getattr(configured, "eval", None), "problems", None))
    if before:  # the base stage measured itself on the same held-out problems: not again
        overrides.append("eval_before=false")
    start, started_at = time.perf_counter(), time.time()
    try:
        result = recipes.run_stage(stage.stage, stage.recipe, overrides, quick=quick)
    except StoppedInTraining as stop:  # the checkpoint is kept, the demo stops here
        raise DemoStopped(f"the demo stopped in stage {stage.name} at step {stop.step} (its checkpoint is in "
                          f"{out_dir / stage.name}); `posttrain demo` again reuses the finished stages and runs "
                          f"{stage.name} anew") from None
    try:
        # on the stage's share of the cores, as it trained (its main gave the process's thread count back)
        with interrupt_on_signals(), threads_for(threads):  # (a SIGTERM here ended the process on the spot)
            measured = _sampled_eval(stage, result.run_dir, result.summary, quick)
    except Interrupted as stop:
        raise Interrupted(stop.signum, f"stage {stage.name} had trained (its final model is in {result.final_dir}) "
                                       "but not been evaluated; `posttrain demo` again runs it anew") from None
    summary = {**result.summary, **before, **measured}
    # the clock times say how stages that ran side by side overlapped (the report's total)
    return {**summary, "seconds": time.perf_counter() - start, "threads": threads, "started_at": started_at,
            "finished_at": time.time(), "demo_settings": _settings(stage, quick),
            **({"base_finished_at": summaries.get(stage.builds_on, {}).get("finished_at")} if stage.builds_on else {})}


def _table(wanted: list[str], ran: set[str], summaries: dict[str, dict[str, Any]], out_dir: Path,
           quick: bool) -> Table:
    table = Table("stage", "time", "result", "model", title="posttrain demo" + (" (quick)" if quick else ""))
    for stage in (s for s in STAGES if s.name in wanted and s.name in summaries):
        summary = summaries[stage.name]
        time_taken = f"{summary['seconds']:.0f}s" if stage.name in ran else "reused"
        table.add_row(stage.name, time_taken, stage.headline(summary), str(out_dir / stage.name / "final"))
    return table


class StageProcess:
    """A child process forked from a server that has already imported what every stage needs (`STAGE_IMPORTS`),
    so a stage starts in a fraction of a second instead of importing for 7-9 s (12 stages: about a minute of a
    demo on 2 cores). `target(*args)` runs in a session of its own (a Ctrl-C in the terminal reaches the demo only)
    with `environment`, and stdout and stderr in `log`; `preload` is what the server imports. It offers what the
    demo uses of `subprocess.Popen`: `pid`, `poll()` (None while it runs, else the exit code; minus the signal's
    number if a signal killed it) and `send_signal`.

    The fork server outlives the demo while a stage runs (each stage holds the pipe whose closing stops it), so a
    stage watches the demo itself (`stop_when_demo_dies`, the demo's pid in DEMO_PID_VARIABLE). Where there is no
    fork server (not POSIX) each stage is a fresh interpreter ("spawn") that imports for itself.
    """

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], log: Path, environment: dict[str, str],
                 preload: tuple[str, ...] = STAGE_IMPORTS) -> None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if context.get_start_method() == "forkserver":
            context.set_forkserver_preload(list(preload))  # read when the server starts (the first stage)
        self.process = context.Process(target=_in_own_session, args=(str(log), environment, target, args),
                                       daemon=False)
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def _in_own_session(log: str, environment: dict[str, str], target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In the child: a session of its own, stdout and stderr to `log`, `environment`, then `target(*args)`."""
    if hasattr(os, "setsid"):  # POSIX; a spawned stage elsewhere shares the demo's console
        os.setsid()
    os.environ.update(environment)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    target(*args)  # with Python's default signal handlers: the fork server restores them in every child it forks


def _stage_main(argv: list[str]) -> None:
    """`posttrain <argv>` in a stage's process."""
    from posttrain.cli import main

    sys.argv = ["posttrain", *argv]
    main()


@dataclass
class _Worker:
    """A stage running in a child process (`posttrain demo --stages <name> --fresh --stage-summary <file>`)."""

    stage: DemoStage
    process: StageProcess
    log: Path
    summary_file: Path
    started: float


def _run_in_parallel(todo: list[DemoStage], out_dir: Path, quick: bool, summaries: dict[str, dict[str, Any]],
                     jobs: int, threads_of: dict[str, int], console: Console) -> None:
    """Run `todo` as up to `jobs` child processes at once, each stage once the stage it builds on has finished;
    merge each finished stage's summary into demo.json as it comes. After a failure or a stop nothing new starts,
    the running stages finish (or stop: SIGINT and SIGTERM are passed on to them), and the demo raises.

    On 2 cores two stages with a thread each ran about 1.45x the stages per minute of one with two (the Intel
    Xeon, 2026-12-03: the chain GRPO stage 87 s with 2 threads, 118-120 s with 1 whether or not grpo-process ran
    beside it): a small model's steps are many small ops that one thread runs nearly as fast as two."""
    waiting, running = list(todo), {}
    failed: list[str] = []
    stopped: list[str] = []
    status_at = time.perf_counter()
    signals = _PassSignalsOn(running)
    with on_stop_signals(signals):
        while waiting or running:
            if not (failed or stopped or signals.received):
                for stage in _ready(waiting, running, jobs):
                    waiting.remove(stage)
                    running[stage.name] = _start_worker(stage, out_dir, quick, threads_of[stage.name])
                    console.print(f"[bold]started[/] {stage.name} ({threads_of[stage.name]} thread(s); "
                                  f"log: {running[stage.name].log})", highlight=False)
            elif waiting:
                waiting.clear()  # nothing new after a failure or a stop
            time.sleep(0.5)
            for name, worker in list(running.items()):
                code = worker.process.poll()
                if code is None:
                    continue
                del running[name]
                if code == 0:
                    summaries[name] = json.loads(worker.summary_file.read_text())
                    _write_summaries(out_dir, summaries, console)
                    console.print(f"[bold green]finished[/] {name} in {summaries[name]['seconds']:.0f}s: "
                                  f"{worker.stage.headline(summaries[name])}", highlight=False)
                elif code > 128 or -code in (signal.SIGINT, signal.SIGTERM):
                    # stopped by a signal: it exits 128 + its number (a checkpoint saved if it had trained), or the
                    # signal ended it before posttrain's handlers were in place (multiprocessing's -number)
                    stopped.append(name)
                    console.print(f"[yellow]stopped[/] {name}: {_last_line(worker.log)}", highlight=False)
                else:
                    failed.append(f"{name} (exit {code}: {_last_line(worker.log)}; log: {worker.log})")
                    console.print(f"[bold red]failed[/] {failed[-1]}", highlight=False)
            if running and time.perf_counter() - status_at >= STATUS_EVERY_S:
                status_at = time.perf_counter()
                console.print("running: " + ", ".join(_progress(w, out_dir) for w in running.values()),
                              highlight=False)
    if failed:
        raise DemoStageFailed("stage(s) failed: " + "; ".join(failed))
    if stopped or signals.received:
        stopped = [s.name for s in todo if s.name in stopped]
        raise DemoStopped(f"the demo stopped (stage(s) {', '.join(stopped) or 'none'} stopped; each saved a "
                          f"checkpoint if it had trained); `posttrain demo` again reuses the finished stages and runs "
                          f"the others anew")


def _ready(waiting: list[DemoStage], running: dict[str, _Worker], jobs: int) -> list[DemoStage]:
    """The waiting stages to start now, critical ones first, then in STAGES order: their base has finished, a
    lane is free, and a stage that runs alone starts when nothing runs, and nothing beside it."""
    if any(w.stage.alone for w in running.values()):
        return []
    ready: list[DemoStage] = []
    busy = {s.name for s in waiting} | set(running)
    for stage in sorted(waiting, key=lambda s: not s.critical):  # stable: STAGES order within each
        if len(running) + len(ready) >= jobs:
            break
        if stage.builds_on in busy:
            continue
        if stage.alone:
            if not (running or ready):
                return [stage]
            continue
        ready.append(stage)
    return ready


def _start_worker(stage: DemoStage, out_dir: Path, quick: bool, threads: int) -> _Worker:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log, summary_file = logs / f"{stage.name}.log", logs / f"{stage.name}.json"
    summary_file.unlink(missing_ok=True)
    argv = ["demo", "--out", str(out_dir), "--stages", stage.name, "--fresh", "--jobs", "1", "--threads",
            str(threads), "--stage-summary", str(summary_file), *(["--quick"] if quick else [])]
    # A session of its own: a Ctrl-C in the terminal reaches the demo only, which passes one SIGINT on (two would
    # make the stage break out of its step instead of finishing it and saving a checkpoint).
    environment = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120"), DEMO_PID_VARIABLE: str(os.getpid())}
    process = StageProcess(_stage_main, (argv,), log, environment)
    return _Worker(stage, process, log, summary_file, time.perf_counter())


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _progress(worker: _Worker, out_dir: Path) -> str:
    """`<stage> step <n>/<max> (<s>s)` from the stage's metrics.jsonl and config.yaml, as far as they exist."""
    run_dir = out_dir / worker.stage.name
    elapsed = f"{time.perf_counter() - worker.started:.0f}s"
    step = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with metrics.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            for line in reversed(f.read().decode(errors="replace").splitlines()):
                with contextlib.suppress(ValueError):
                    step = json.loads(line).get("step")
                    if step is not None:
                        break
    if step is None:
        return f"{worker.stage.name} preparing ({elapsed})"
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError):
        step = f"{step}/{yaml.safe_load((run_dir / 'config.yaml').read_text())['train']['max_steps']}"
    return f"{worker.stage.name} step {step} ({elapsed})"


class _PassSignalsOn:
    """A SIGINT or SIGTERM handler (`on_stop_signals`) that passes the signal on to the running stages (each
    finishes its step, saves a checkpoint and exits) and records it in `received`; the demo then waits for them
    and stops."""

    def __init__(self, running: dict[str, _Worker]) -> None:
        self.running, self.received = running, False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        for worker in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)
