"""GRPO workload of BENCHMARK.md: posttrain vs TRL's GRPOTrainer.

    python -m benchmarks.grpo [--size small] [--steps 8] [--libraries posttrain,trl]
    python -m benchmarks.grpo --libraries posttrain:bf16,trl:fp32,posttrain:bf16,trl:fp32   # bf16 against TRL fp32

Each library runs in its own subprocess, one after the other, on the same model files and prompts.
Settings (both): fp32 (bf16 with --precision, or each run's own in --libraries), 8 prompts x 8 completions per
step, one optimizer step per generation round, at most 32 new tokens, temperature 1, lr 1e-5 constant, no
warm-up, weight decay 0, clip 1.0, beta 0 (no reference model), token-level ("dapo") loss aggregation, reward =
exact match of the first integer of the completion, no gradient checkpointing, no eval, no saving. A random-init
model rarely emits EOS, so nearly every completion is 32 tokens long.

s/step is the wall time between optimizer steps (generation, scoring, forward, backward, optimizer)
after 2 warm-up steps; generation_share is the share of it spent generating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    PRECISION,
    TRL_ARGS,
    WARMUP_STEPS,
    add_allocator_arguments,
    add_precision_argument,
    arith_rows,
    model_dir,
    non_embedding_parameters,
    print_ratios,
    print_table,
    profiled,
    record_run,
    run_worker,
    timed_rl_fit,
    trl_clock,
    use_allocator,
    use_precision,
    worker_specs,
)

PROMPTS, GROUP, NEW_TOKENS, LR = 8, 8, 32, 1e-5


def verifiable_rows() -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in arith_rows()]


def posttrain_worker(directory: Path, steps: int) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.models.value import ActorCritic
    from posttrain.recipes.grpo import GRPOConfig
    from posttrain.recipes.rl import build_rewards, resolve_task
    from posttrain.recipes.rl_loop import RLStepSource, rl_loss_fn
    from posttrain.rollout import make_engine
    from posttrain.train.engine import Trainer
    from posttrain.train.run_dir import prepare_run_dir

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(GRPOConfig, None, [
            f"model.path={directory}", f"run.out_dir={out}", "run.progress=false", "data.template=plain",
            "data.max_length=128", f"train.max_steps={steps}",
            f"train.precision={PRECISION}", f"train.batch_size={PROMPTS * GROUP}",
            f"train.micro_batch_size={PROMPTS * GROUP}", "train.save_every=0", f"optim.lr={LR}",
            "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0", "optim.beta2=0.999",
            "optim.grad_clip=1.0", f"sampling.samples_per_prompt={GROUP}", f"sampling.max_new_tokens={NEW_TOKENS}",
            "sampling.temperature=1.0", "reward.task=arith", "kl.coef=0", "loss.agg=token-mean",
            "update.epochs=1", "eval_before=false"])
        tokenizer = load_tokenizer(directory)
        model = load_causal_lm(directory)
        prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["grpo"], rows=verifiable_rows())
        run_dir = prepare_run_dir(cfg.run, cfg, stage="grpo")
        policy = ActorCritic(model, values=False)
        source = RLStepSource(cfg, prepared, make_engine("local", model, tokenizer), policy,
                              build_rewards(cfg.reward, resolve_task(cfg)))
        trainer = Trainer(stage="grpo", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                          model=policy)
        return timed_rl_fit(trainer, source, rl_loss_fn(cfg, NEW_TOKENS), model)


def trl_worker(directory: Path, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.tasks import get_task

    task = get_task("arith")

    def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
        return [task.verify(c, a) for c, a in zip(completions, answer, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(directory)
    # use_kernels=False, as posttrain loads models: on a GPU, transformers would otherwise fetch layers from the Hub.
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa",
                                                 use_kernels=False)
    clock, callback = trl_clock(model)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                          max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=LR, max_steps=steps,
                          beta=0.0, loss_type="dapo", num_iterations=1, steps_per_generation=1, **TRL_ARGS)
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args,
                              train_dataset=Dataset.from_list(verifiable_rows()), processing_class=tokenizer,
                              callbacks=[callback])
        generation: list[float] = []
        generate = trainer._generate

        def timed_generate(*a, **k):
            start = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                generation.append(time.perf_counter() - start)

        trainer._generate = timed_generate
        with profiled(f"grpo-trl-{PRECISION}"):
            trainer.train()
    summary = clock.summary(non_embedding_parameters(model), mfu=False)
    return {**summary, "generation_share": statistics.mean(generation[WARMUP_STEPS:]) / summary["s_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=("posttrain", "trl"))
    parser.add_argument("--size", default="small")
    add_precision_argument(parser)
    add_allocator_arguments(parser)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--libraries", default="posttrain,trl",
                        help="LIBRARY[:PRECISION],...: runs in this order (the precision: --precision's by default)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        worker = posttrain_worker if args.library == "posttrain" else trl_worker
        print(json.dumps(worker(model_dir(args.size), args.steps)))
        return
    runs = worker_specs(args.libraries, args.precision)
    use_allocator(args.preload, args.preload_for)
    model_dir(args.size)  # build once, before any worker is timed
    rows = []
    for library, precision in runs:
        use_precision(precision)
        result = run_worker("benchmarks.grpo", ["--library", library, "--size", args.size, "--steps", str(args.steps)])
        record_run(rows, "grpo", args.size, {"workload": "grpo 8x8, 32 tokens", "library": library, **result})
    print_table(rows, ["workload", "library", "precision", "s_per_step", "trained_tok_per_s", "mfu", "peak_rss_mb",
                       "generation_share"])
    print_ratios(rows)  # consecutive pairs: `--libraries posttrain,trl,posttrain,trl` gives two


if __name__ == "__main__":
    main()
