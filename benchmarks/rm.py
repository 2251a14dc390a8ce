"""Reward-model workload of BENCHMARK.md: posttrain vs TRL's RewardTrainer.

    python -m benchmarks.rm [--size small] [--steps 12] [--runs posttrain:padding_free,trl:padded]

Each library runs in its own subprocess, one after the other; the same model files and pairs feed
both. Settings (both): fp32, 8 pairs per step, Bradley–Terry loss, a linear scalar head on the
causal LM's trunk, lr 1e-4 constant, no warm-up, weight decay 0, clip 1.0, max_length 128, full
training, no gradient checkpointing, no eval, no saving. posttrain also runs padding-free (a step's
16 sequences in rows of at most 256 tokens, `data.padding_free_capacity`'s default, each pair's prompt once for its
two answers, `data.share_prompts`'s default: no MFU is reported for it, 6 N x the sequences' tokens would count each
prompt twice; TRL's RewardTrainer has no such mode).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    TRL_ARGS,
    add_allocator_arguments,
    add_precision_argument,
    arith_pairs,
    model_dir,
    non_embedding_parameters,
    offline_overrides,
    print_ratios,
    print_table,
    record_run,
    run_worker,
    shares_prompts,
    timed_fit,
    trl_clock,
    use_allocator,
    use_precision,
)

PAIRS, MAX_LENGTH, LR = 8, 128, 1e-4


def posttrain_worker(directory: Path, batch_mode: str, steps: int) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.models import load_tokenizer
    from posttrain.models.reward import build_reward_model
    from posttrain.recipes.rm import RMConfig, comparison_loss_fn
    from posttrain.train.comparisons import comparison_step_source
    from posttrain.train.engine import Trainer
    from posttrain.train.run_dir import prepare_run_dir

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(RMConfig, None, offline_overrides(directory, out, batch_mode, steps, PAIRS, MAX_LENGTH, LR))
        tokenizer = load_tokenizer(directory)
        model = build_reward_model(directory, pad_token_id=tokenizer.pad_token_id)
        prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["rm"], rows=arith_pairs(),
                                mask_dtype=model.dtype)
        run_dir = prepare_run_dir(cfg.run, cfg, stage="rm")
        trainer = Trainer(stage="rm", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                          model=model)
        shared = shares_prompts(cfg)
        summary = timed_fit(trainer, comparison_step_source(prepared, cfg.train, cfg.run.seed),
                            comparison_loss_fn(cfg), model, mfu=not shared)
        return {**summary, "share_prompts": shared}


def trl_worker(directory: Path, batch_mode: str, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tokenizer.pad_token_id
    clock, callback = trl_clock(model)
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, per_device_train_batch_size=PAIRS, max_length=MAX_LENGTH, learning_rate=LR,
                            max_steps=steps, **TRL_ARGS)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(arith_pairs()),
                                processing_class=tokenizer, callbacks=[callback])
        trainer.train()
    return clock.summary(non_embedding_parameters(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=("posttrain", "trl"))
    parser.add_argument("--size", default="small")
    add_precision_argument(parser)
    add_allocator_arguments(parser)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-mode", default="padded")
    parser.add_argument("--runs", default="posttrain:padding_free,trl:padded,posttrain:padded",
                        help="library:batch_mode pairs (batch_mode: padded or padding_free)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        worker = posttrain_worker if args.library == "posttrain" else trl_worker
        print(json.dumps(worker(model_dir(args.size), args.batch_mode, args.steps)))
        return
    use_precision(args.precision)
    use_allocator(args.preload, args.preload_for)
    model_dir(args.size)  # build once, before any worker is timed
    rows = []
    for run in args.runs.split(","):
        library, batch_mode = run.split(":")
        result = run_worker("benchmarks.rm", ["--library", library, "--size", args.size, "--batch-mode", batch_mode,
                                              "--steps", str(args.steps)])
        record_run(rows, "rm", args.size, {"workload": f"reward model, {batch_mode}", "library": library, **result})
    print_table(rows, ["workload", "library", "s_per_step", "trained_tok_per_s", "mfu", "peak_rss_mb"])
    print_ratios(rows)


if __name__ == "__main__":
    main()
