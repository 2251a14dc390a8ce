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
    StepClock,
    append_result,
    arith_rows,
    model_dir,
    non_embedding_parameters,
    print_table,
    run_worker,
)

BATCH, MAX_LENGTH, LR = 16, 128, 1e-4


def posttrain_worker(directory: Path, mode: str, steps: int) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipes.sft import SFTConfig, sft_loss_fn, step_source
    from posttrain.run import prepare_run_dir
    from posttrain.train.engine import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(SFTConfig, None, [
            f"model.path={directory}", f"run.out_dir={out}", "run.progress=false", "run.log_every=1000",
            "data.template=plain", f"data.max_length={MAX_LENGTH}", f"data.batch_mode={mode}",
            f"train.max_steps={steps}", f"train.batch_size={BATCH}", f"train.micro_batch_size={BATCH}",
            "train.save_every=0", f"optim.lr={LR}", "optim.schedule=constant", "optim.warmup_steps=0",
            "optim.weight_decay=0", "optim.beta2=0.999", "optim.grad_clip=1.0"])
        tokenizer = load_tokenizer(directory)
        model = load_causal_lm(directory)
        prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["sft"], rows=arith_rows())
        run_dir = prepare_run_dir(cfg.run, cfg, stage="sft")
        trainer = Trainer(stage="sft", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                          model=model)
        clock = StepClock()
        source = step_source(prepared, cfg.train, cfg.run.seed)
        timed = _TimedSource(source, clock)
        clock.start()
        trainer.fit(timed, sft_loss_fn)
        timed.finish()
        return clock.summary(non_embedding_parameters(model))


class _TimedSource:
    """Marks the clock each time the Trainer asks for the next step (= the previous step ended)."""

    def __init__(self, source: Any, clock: StepClock) -> None:
        self.source, self.clock, self._pending = source, clock, None

    def next_step(self):
        if self._pending is not None:
            self.clock.step(self._pending)
        batch = self.source.next_step()
        self._pending = batch.tokens
        return batch

    def finish(self) -> None:
        if self._pending is not None:
            self.clock.step(self._pending)
            self._pending = None

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def trl_worker(directory: Path, mode: str, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in arith_rows()]
    clock = StepClock()
    tokens = {"n": 0}

    def count_tokens(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        tokens["n"] += int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel())

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step(tokens["n"])
            tokens["n"] = 0

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH,
            max_length=MAX_LENGTH, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, max_steps=steps,
            logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
            completion_only_loss=True, padding_free=mode == "padding_free", packing=mode == "packed", seed=0,
            dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    return clock.summary(non_embedding_parameters(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=("posttrain", "trl"))
    parser.add_argument("--size", default="small")
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
    model_dir(args.size)  # build once, before any worker is timed
    rows = []
    for mode in args.modes.split(","):
        for library in args.libraries.split(","):
            result = run_worker("benchmarks.sft", ["--library", library, "--size", args.size, "--mode", mode,
                                                   "--steps", str(args.steps)])
            rows.append({"workload": f"sft {mode}", "library": library, **result})
            append_result("sft", {"workload": f"sft {mode}", "library": library, "size": args.size, **result})
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows, ["workload", "library", "s_per_step", "trained_tok_per_s", "mfu", "peak_rss_mb"])
    for mode in args.modes.split(","):
        ours = [r for r in rows if r["workload"] == f"sft {mode}" and r["library"] == "posttrain"]
        theirs = [r for r in rows if r["workload"] == f"sft {mode}" and r["library"] == "trl"]
        if ours and theirs:
            print(f"sft {mode}: posttrain is {theirs[0]['s_per_step'] / ours[0]['s_per_step']:.2f}x TRL per step")


if __name__ == "__main__":
    main()
