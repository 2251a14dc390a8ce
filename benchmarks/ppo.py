"""PPO workload of BENCHMARK.md: posttrain vs TRL's experimental PPOTrainer (trl 1.12).

    python -m benchmarks.ppo [--size small] [--steps 6] [--critics separate,shared] [--libraries posttrain,trl]

Each run is its own subprocess, one after the other, on the same model files and prompts.
Settings (both): fp32, 64 prompts per step, one completion each, at most 32 new tokens, temperature 1,
stop at EOS, 1 PPO epoch of 1 minibatch, kl_coef 0.05 (k1 in the reward), gamma 1, lambda 0.95,
clip 0.2, value clip 0.2, vf_coef 0.1, lr 1e-5 constant, no warm-up, weight decay 0, grad clip 1.0.
Policy, reference, critic and reward model come from the same checkpoint: the reward model and the
critic are its trunk with a fresh scalar head (saved once as `<model>-rm`). posttrain runs with the
separate critic (as TRL) and with a value head on the policy's trunk (`--critics`), with the recipe's
default `update.micro_batch_tokens` (passes of at most 1024 token positions: the same gradient as one pass
over the 64 completions, a peak RSS about half as large), and with the separate critic in one pass over the
64 completions, as TRL's settings here run (`separate:whole`): the peak RSS like for like.

TRL 1.12 is the last release with `trl.experimental.ppo`; it is installed next to the newer trl of
the `bench` extra, into benchmarks/.cache/trl-1.12 with `pip install --no-deps --target ...`
(`--install-trl` does it), and imported from there by the TRL worker only.

s/step is the wall time between optimizer steps (generation, scoring, reference and value
forwards, policy and critic forward/backward, optimizer) after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    CACHE,
    PRECISION,
    TRL_ARGS,
    add_allocator_arguments,
    add_precision_argument,
    arith_rows,
    model_dir,
    non_embedding_parameters,
    print_table,
    record_run,
    run_worker,
    timed_rl_fit,
    trl_clock,
    use_allocator,
    use_precision,
)

PROMPTS, NEW_TOKENS, LR, KL_COEF = 64, 32, 1e-5, 0.05
TRL_DIR = CACHE / "trl-1.12"


def reward_dir(size: str) -> Path:
    """The reward model (and critic initialisation) of the workload: `model_dir(size)`'s trunk with a fresh
    scalar head, seed 0, saved once."""
    from posttrain.models import load_tokenizer
    from posttrain.models.reward import build_reward_model

    out = CACHE / f"model-{size}-rm"
    if (out / "model.safetensors").is_file():
        return out
    base = model_dir(size)
    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = build_reward_model(base, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def install_trl() -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TRL_DIR),
                    "trl==1.12.0"], check=True)


def prompt_rows() -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in arith_rows()]


def posttrain_worker(size: str, steps: int, critic: str, whole_batch: bool = False) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.pipeline import prepare_data
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.models.value import ActorCritic
    from posttrain.recipes.ppo import PPOConfig, build_critic
    from posttrain.recipes.rl import build_reference, build_rewards, resolve_task
    from posttrain.recipes.rl_loop import RLStepSource, rl_loss_fn
    from posttrain.rollout import make_engine
    from posttrain.train.engine import Trainer
    from posttrain.train.run_dir import prepare_run_dir

    directory, rm = model_dir(size), reward_dir(size)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(PPOConfig, None, [
            f"model.path={directory}", f"run.out_dir={out}", "run.progress=false", "data.template=plain",
            "data.max_length=128", f"train.max_steps={steps}",
            f"train.precision={PRECISION}", f"train.batch_size={PROMPTS}",
            f"train.micro_batch_size={PROMPTS}", "train.save_every=0", f"optim.lr={LR}", "optim.schedule=constant",
            "optim.warmup_steps=0", "optim.weight_decay=0", "optim.beta2=0.999", "optim.grad_clip=1.0",
            f"sampling.max_new_tokens={NEW_TOKENS}", "sampling.temperature=1.0", f"update.rollout_batch_size={PROMPTS}",
            "update.epochs=1", f"kl.coef={KL_COEF}", "kl.kind=k1", "advantage.lam=0.95", "loss.vf_coef=0.1",
            "reward.functions={reward_model: 1.0}", f"reward.model_path={rm}", "reward.task=arith",
            f"critic.kind={critic}", "critic.init=reward_model", "eval_before=false",
            # whole_batch: one pass over the 64 completions, as TRL's settings here (the peak-RSS comparison)
            *(["update.micro_batch_tokens=null"] if whole_batch else [])])
        tokenizer = load_tokenizer(directory)
        actor = load_causal_lm(directory)
        prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["ppo"], rows=prompt_rows())
        run_dir = prepare_run_dir(cfg.run, cfg, stage="ppo")
        reference = build_reference(cfg.kl.coef, cfg.adapter, actor)
        model = ActorCritic(actor, build_critic(cfg))
        source = RLStepSource(cfg, prepared, make_engine("local", actor, tokenizer), model,
                              build_rewards(cfg.reward, resolve_task(cfg)), reference=reference)
        trainer = Trainer(stage="ppo", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim, run_dir=run_dir,
                          model=model)
        return timed_rl_fit(trainer, source, rl_loss_fn(cfg, NEW_TOKENS), actor)


def trl_worker(size: str, steps: int) -> dict[str, Any]:
    if not (TRL_DIR / "trl").is_dir():
        raise RuntimeError(f"trl 1.12 is not installed in {TRL_DIR}: run `python -m benchmarks.ppo --install-trl`")
    sys.path.insert(0, str(TRL_DIR))  # trl 1.12 before the newer trl of the environment
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    directory, rm = model_dir(size), reward_dir(size)
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    causal = dict(dtype=torch.float32, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(directory, **causal)
    ref_model = AutoModelForCausalLM.from_pretrained(directory, **causal)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, **causal)
    value_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, **causal)
    rows = [{"input_ids": tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]} for r in prompt_rows()]
    clock, callback = trl_clock(model)
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1,
                         num_ppo_epochs=1, num_mini_batches=1, total_episodes=PROMPTS * steps,
                         local_rollout_forward_batch_size=PROMPTS, response_length=NEW_TOKENS, temperature=1.0,
                         stop_token="eos", kl_coef=KL_COEF, kl_estimator="k1", lam=0.95, vf_coef=0.1,
                         cliprange=0.2, cliprange_value=0.2, learning_rate=LR, num_sample_generations=0, **TRL_ARGS)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=model, ref_model=ref_model,
                             reward_model=reward_model, train_dataset=Dataset.from_list(rows),
                             value_model=value_model, callbacks=[callback])
        trainer.train()
    return clock.summary(non_embedding_parameters(model), mfu=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=("posttrain", "trl"))
    parser.add_argument("--critic", default="separate", choices=("separate", "shared"))
    parser.add_argument("--whole-batch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small")
    add_precision_argument(parser)
    add_allocator_arguments(parser)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--libraries", default="posttrain,trl")
    parser.add_argument("--critics", default="separate,shared,separate:whole",
                        help="posttrain's critic kinds to measure; `:whole`: in one pass over the step's completions "
                             "(update.micro_batch_tokens=null), as TRL runs here")
    parser.add_argument("--install-trl", action="store_true", help="install trl 1.12 into benchmarks/.cache")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.install_trl:
        install_trl()
        return
    if args.worker:
        result = (posttrain_worker(args.size, args.steps, args.critic, args.whole_batch) if args.library == "posttrain"
                  else trl_worker(args.size, args.steps))
        print(json.dumps(result))
        return
    use_precision(args.precision)
    use_allocator(args.preload, args.preload_for)
    reward_dir(args.size)  # build once, before any worker is timed
    runs = [("posttrain", critic) for critic in args.critics.split(",") if "posttrain" in args.libraries]
    runs += [("trl", "separate")] if "trl" in args.libraries else []
    rows = []
    for library, critic in runs:
        kind, _, passes = critic.partition(":")
        result = run_worker("benchmarks.ppo", ["--library", library, "--critic", kind, "--size", args.size,
                                               "--steps", str(args.steps), *(["--whole-batch"] if passes else [])])
        record_run(rows, "ppo", args.size, {"workload": f"ppo {PROMPTS}x{NEW_TOKENS} tokens", "library": library,
                                            "critic": critic, **result})
    print_table(rows, ["workload", "library", "critic", "s_per_step", "trained_tok_per_s", "mfu", "peak_rss_mb",
                       "generation_share"])
    theirs = [r for r in rows if r["library"] == "trl"]
    for ours in (r for r in rows if r["library"] == "posttrain"):
        if theirs:
            print(f"ppo ({ours['critic']} critic): posttrain is {theirs[0]['s_per_step'] / ours['s_per_step']:.2f}x "
                  f"TRL per step, peak RSS {ours['peak_rss_mb'] / theirs[0]['peak_rss_mb']:.2f}x TRL's")


if __name__ == "__main__":
    main()
