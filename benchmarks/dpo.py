"""DPO workload of BENCHMARK.md: posttrain vs TRL's DPOTrainer.

    python -m benchmarks.dpo [--size small] [--steps 12] [--runs LIBRARY:REFERENCE:BATCH_MODE,...]

Each (library, variant) runs in its own subprocess, one after the other; the same model files and
pairs feed both. Settings (both): fp32, 8 pairs per step, sigmoid loss, beta 0.1, lr 1e-5 constant,
no warm-up, weight decay 0, clip 1.0, max_length 128, a frozen reference model (a copy of the
policy), no gradient checkpointing, no eval, no saving. posttrain's default precomputes the
reference logprobs once before training, with the untrained policy itself (the time it takes is
reported beside the steps, and per step of an epoch, never inside them); `live` runs a frozen
copy's forward in every step, as TRL does by default. padding_free puts a step's 16 sequences in
rows of at most 256 tokens (posttrain, `data.padding_free_capacity`'s default, each pair's prompt once for its
two answers, `data.share_prompts`'s default: no MFU is reported for it, 6 N x the sequences' tokens would count
each prompt twice; TRL: its padding_free option, one row, every sequence whole).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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

PAIRS, MAX_LENGTH, LR, BETA = 8, 128, 1e-5, 0.1


def posttrain_worker(directory: Path, variant: str, batch_mode: str, steps: int) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipes.dpo import DPOConfig, cached_step_source, dpo_loss_fn
    from posttrain.train.comparisons import comparison_step_source
    from posttrain.train.engine import Trainer
    from posttrain.train.reference import Reference, precompute_sequence_logprobs
    from posttrain.train.run_dir import prepare_run_dir

    with tempfile.TemporaryDirectory() as out:
        overrides = offline_overrides(directory, out, batch_mode, steps, PAIRS, MAX_LENGTH, LR)
        cfg = load_config(DPOConfig, None, [*overrides, "loss.kind=sigmoid", f"loss.beta={BETA}"])
        tokenizer = load_tokenizer(directory)
        model = load_causal_lm(directory)
        prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["dpo"], rows=arith_pairs())
        run_dir = prepare_run_dir(cfg.run, cfg, stage="dpo")
        precompute_s = 0.0
        if variant == "precomputed":  # as the recipe: the untrained policy is the reference, no copy
            start = time.perf_counter()
            cached = precompute_sequence_logprobs(Reference(model), prepared, cfg.reference.batch_size)
            precompute_s = time.perf_counter() - start
            source, reference = cached_step_source(prepared, cfg.train, cfg.run.seed, cached), None
        else:
            source, reference = comparison_step_source(prepared, cfg.train, cfg.run.seed), Reference.frozen_copy(model)
        trainer = Trainer(stage="dpo", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                          model=model)
        shared = shares_prompts(cfg)
        summary = timed_fit(trainer, source, dpo_loss_fn(cfg.loss, reference), model, mfu=not shared)
        # The reference pass replaces one reference forward per step for a whole epoch: its share per step.
        amortised = precompute_s * PAIRS / len(prepared.dataset)
        return {**summary, "share_prompts": shared, "precompute_s": precompute_s,
                "precompute_s_per_step": amortised}


def trl_worker(directory: Path, variant: str, batch_mode: str, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    clock, callback = trl_clock(model)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=PAIRS, max_length=MAX_LENGTH, learning_rate=LR,
                         max_steps=steps, beta=BETA, loss_type=["sigmoid"],
                         precompute_ref_log_probs=variant == "precomputed",
                         padding_free=batch_mode == "padding_free", **TRL_ARGS)
        trainer = DPOTrainer(model=model, ref_model=reference, args=args,
                             train_dataset=Dataset.from_list(arith_pairs()), processing_class=tokenizer,
                             callbacks=[callback])
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
    parser.add_argument("--variant", default="precomputed")
    parser.add_argument("--batch-mode", default="padded")
    # Like for like first: TRL precomputes its reference logprobs (in DPOTrainer's constructor, outside its clock, as
    # posttrain's are outside its own) and runs padding-free too; then each library's default.
    parser.add_argument("--runs", default="posttrain:precomputed:padding_free,trl:precomputed:padding_free,"
                                          "posttrain:live:padded,trl:live:padded",
                        help="library:reference:batch_mode triples (reference: precomputed or live logprobs; "
                             "batch_mode: padded or padding_free)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        worker = posttrain_worker if args.library == "posttrain" else trl_worker
        print(json.dumps(worker(model_dir(args.size), args.variant, args.batch_mode, args.steps)))
        return
    use_precision(args.precision)
    use_allocator(args.preload, args.preload_for)
    model_dir(args.size)  # build once, before any worker is timed
    rows = []
    for run in args.runs.split(","):
        library, variant, batch_mode = run.split(":")
        result = run_worker("benchmarks.dpo", ["--library", library, "--size", args.size, "--variant", variant,
                                               "--batch-mode", batch_mode, "--steps", str(args.steps)])
        record_run(rows, "dpo", args.size, {"workload": f"dpo {variant} ref, {batch_mode}", "library": library,
                                            **result})
    print_table(rows, ["workload", "library", "s_per_step", "trained_tok_per_s", "mfu", "peak_rss_mb"])
    print_ratios(rows)


if __name__ == "__main__":
    main()
