"""SFT workload of BENCHMARK.md: posttrain vs TRL's SFTTrainer, padded / padding-free / packed.

    python -m benchmarks.sft [--size small] [--steps 12] [--modes padded,padding_free,packed]

Each (library, mode) runs in its own subprocess, one after the other; the same model files and
rows feed both. Settings (both): fp32, batch 16 (packed: 16 rows of up to 128 tokens), max_length 128,
lr 1e-4 constant, no warm-up, weight decay 0, clip 1.0, completion-only loss, no gradient checkpointing,
no eval, no saving.
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
    arith_rows,
    model_dir,
    non_embedding_parameters,
    offline_overrides,
    print_ratios,
    print_table,
    record_run,
    run_worker,
    timed_fit,
    trl_clock,
    use_allocator,
    use_precision,
)

BATCH, MAX_LENGTH, LR = 16, 128, 1e-4


def posttrain_worker(directory: Path, mode: str, steps: int) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipes.sft import SFTConfig, sft_loss_fn, step_source
    from posttrain.train.engine import Trainer
    from posttrain.train.run_dir import prepare_run_dir

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(SFTConfig, None, offline_overrides(directory, out, mode, steps, BATCH, MAX_LENGTH, LR))
        tokenizer = load_tokenizer(directory)
        model = load_causal_lm(directory)
        prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["sft"], rows=arith_rows())
        run_dir = prepare_run_dir(cfg.run, cfg, stage="sft")
        trainer = Trainer(stage="sft", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                          model=model)
        return timed_fit(trainer, step_source(prepared, cfg.train, cfg.run.seed), sft_loss_fn, model)


def trl_worker(directory: Path, mode: str, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in arith_rows()]
    clock, callback = trl_clock(model)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            # TRL refuses max_length with padding-free batches; the rows are all shorter than 128 tokens.
            output_dir=out, per_device_train_batch_size=BATCH,
            max_length=None if mode == "padding_free" else MAX_LENGTH, learning_rate=LR,
            max_steps=steps, completion_only_loss=True, padding_free=mode == "padding_free",
            packing=mode == "packed", **TRL_ARGS)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
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
    parser.add_argument("--mode", default="padded")
    parser.add_argument("--modes", default="padded,padding_free,packed")
    parser.add_argument("--libraries", default="posttrain,trl")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        worker = posttrain_worker if args.library == "posttrain" else trl_worker
        print(json.dumps(worker(model_dir(args.size), args.mode, args.steps)))
        return
    use_precision(args.precision)
    use_allocator(args.preload, args.preload_for)
    model_dir(args.size)  # build once, before any worker is timed
    rows = []
    for mode in args.modes.split(","):
        for library in args.libraries.split(","):
            result = run_worker("benchmarks.sft", ["--library", library, "--size", args.size, "--mode", mode,
                                                   "--steps", str(args.steps)])
            record_run(rows, "sft", args.size, {"workload": f"sft {mode}", "library": library, **result})
    print_table(rows, ["workload", "library", "s_per_step", "trained_tok_per_s", "mfu", "peak_rss_mb"])
    print_ratios(rows)  # each mode's consecutive pairs: `--libraries posttrain,trl,posttrain,trl` gives two


if __name__ == "__main__":
    main()
