"""Scale-out on CPU: 2 gloo processes against the same work done by one process.

One spawn of 2 ranks runs every distributed scenario (process start-up is most of the cost) and
writes its results to files; each test compares one of them with a single-process reference
computed here, in the pytest process:

- DDP: 2 ranks x 8 samples (2 micro-batches each) give the gradients of 1 rank x 16;
- FSDP2: the same optimizer steps, with sharded parameters, gradients and optimizer state;
- a sharded (DCP) checkpoint saved at step 2 and resumed gives bitwise the parameters of an
  uninterrupted 4-step run;
- the RL stages (PPO with a critic, RFT with a grader, critic-free baselines and the SFT blend, GRPO with
  batch statistics and skipped groups) give the losses and weights of one process: every rank samples its
  share of a round's prompts, and advantages, shuffles and normalisers are those of the whole round.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from posttrain.config import OptimConfig, RunConfig, param, section
from posttrain.models.io import load_causal_lm, save_pretrained
from posttrain.recipes.sft import sft_loss_fn
from posttrain.rewards.functions import register_reward_function
from posttrain.rollout import Rollout, RolloutEngine, text_rollout
from posttrain.train.engine import TrainConfig, Trainer
from posttrain.train.run_dir import prepare_run_dir
from posttrain.train.sources import ShuffledStepSource

WORLD = 2
SAMPLES = 16


@dataclasses.dataclass(frozen=True)
class _Config:
    run: RunConfig = section(RunConfig, "run")
    train: TrainConfig = section(TrainConfig, "train")
    optim: OptimConfig = section(OptimConfig, "optim")
    note: str = param("", "unused")


def _samples(vocab: int) -> list[dict[str, list[int]]]:
    """Sequences of different lengths; the second half of each is the trained response."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(SAMPLES):
        length = int(torch.randint(6, 20, (1,), generator=generator))
        ids = torch.randint(4, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "response_mask": [0] * (length // 2) + [1] * (length - length // 2)})
    return rows


def _source(rows: list[dict[str, list[int]]], train: TrainConfig) -> ShuffledStepSource:
    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(rows[i]["input_ids"]) for i in indices)
        batch = {k: torch.zeros(len(indices), width, dtype=torch.long) for k in ("input_ids", "attention_mask",
                                                                                 "response_mask")}
        for j, i in enumerate(indices):
            n = len(rows[i]["input_ids"])
            batch["input_ids"][j, :n] = torch.tensor(rows[i]["input_ids"])
            batch["attention_mask"][j, :n] = 1
            batch["response_mask"][j, :n] = torch.tensor(rows[i]["response_mask"])
        return batch

    def count(indices: list[int]) -> tuple[float, int]:
        return float(sum(sum(rows[i]["response_mask"]) for i in indices)), sum(len(rows[i]["input_ids"])
                                                                              for i in indices)

    return ShuffledStepSource(len(rows), train.batch_size, train.micro_batch_size, seed=3, collate=collate,
                              count=count)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def _train(model_dir: Path, out: Path, name: str, *, steps: int, parallel: str = "ddp", save_every: int = 0,
           resume: bool = False, evaluate: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`steps` optimizer steps of the SFT loss (`evaluate`: its held-out loss after every step, on rank 0 as every
    evaluation runs); returns (gradients of the first step, final parameters)."""
    from posttrain.eval.heldout import heldout_loss

    model = load_causal_lm(model_dir)
    train = TrainConfig(max_steps=steps, batch_size=SAMPLES, micro_batch_size=4, save_every=save_every,
                        parallel=parallel, eval_every=1 if evaluate else 0)
    cfg = _Config(run=RunConfig(name=name, out_dir=str(out), progress=False, overwrite=not resume, resume=resume),
                  train=train, optim=OptimConfig(lr=1e-3, schedule="constant"))
    trainer = Trainer(stage="sft", cfg=cfg, run=cfg.run, train=train, optim=cfg.optim,
                      run_dir=prepare_run_dir(cfg.run, cfg, "sft"), model=model)
    grads: dict[str, torch.Tensor] = {}

    def record_first_gradients(*_):
        if not grads:  # collective under FSDP (full_tensor): every rank records
            grads.update({n: _full(p.grad) for n, p in model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(record_first_gradients)
    source = _source(_samples(model.config.vocab_size), train)
    held_out = (lambda step, final: heldout_loss(model, SAMPLES, source.collate, lambda rows: source.count(rows)[0],
                                                 sft_loss_fn, batch_size=4)) if evaluate else None
    trainer.fit(source, sft_loss_fn, held_out)
    return grads, {n: _full(p) for n, p in model.named_parameters()}


class PromptEngine(RolloutEngine):
    """Completions that depend on the prompt alone (not on the rank, the batch or a random stream), so that
    2 ranks and 1 process train on the same round: a number per sample, the same for every sample of about
    half the prompts (equal-reward groups), each ending in EOS."""

    sampled = 0  # prompts sampled in this process

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def update_weights(self, model) -> None:
        pass

    def generate(self, prompts, params, generator=None) -> Rollout:
        PromptEngine.sampled += len(prompts)
        texts = []
        for prompt in prompts:
            base = sum(prompt) * 7
            texts.append([str((base + (0 if base % 2 else 13 * j)) % 100) for j in range(params.n)])
        return text_rollout(prompts, texts, self.tokenizer)


@register_reward_function("dist_residue")
def _residue(batch) -> list[float]:
    return [float(int(text) % 3 == 0) for text in batch.completions]


@register_reward_function("dist_flaky_on_rank_1")
def _flaky_on_rank_1(batch) -> list[float]:
    """Right answers score 1, but on rank 1 (and in the one process compared with it) the last right answer of
    the batch a process scores is NaN, an error: offline RFT's ranks each scored the whole set, so rank 1 alone
    left that row out and the ranks trained different rows."""
    scores = [float(text == answer) for text, answer in zip(batch.completions, batch.answers, strict=True)]
    right = [i for i, score in enumerate(scores) if score]
    if os.environ.get("RANK", "1") == "1" and right:
        scores[right[-1]] = float("nan")
    return scores


@register_reward_function("dist_down_on_rank_1")
def _down_on_rank_1(batch) -> list[float]:
    """A service the reward calls that is down on one node: every completion rank 1 scores is an error."""
    if os.environ.get("RANK") == "1":
        raise ConnectionError("the grading service is down on this node")
    return [1.0] * len(batch.completions)


# Adam's eps as large as the gradients makes each update proportional to its gradient, so the ranks' other order of
# summation stays rounding in the weights too; with the default eps a near-zero gradient whose sign rounds the other
# way moves its weight by a whole step the other way.
_RL_COMMON = ["run.progress=false", "train.save_every=0", "eval.problems=2", "eval.samples=0", "eval.max_new_tokens=4",
              "eval_before=false", "data.size=32", "sampling.max_new_tokens=6", "optim.lr=0.1", "optim.eps=1.0"]
RL_RUNS = {
    # A separate critic, GAE, whitening, KL in the reward (2 rounds: the second's pi_old is off the reference),
    # 2 epochs x 2 minibatches (one shuffle over both ranks' rows), micro-batches cut by a token budget.
    "ppo": ("ppo", ["update.rollout_batch_size=16", "train.batch_size=8", "train.micro_batch_size=4",
                    "update.epochs=2", "train.max_steps=8", "kl.coef=0.1", "update.micro_batch_tokens=60",
                    "reward.functions={dist_residue: 1.0}"]),
    # The arith-partial grader (sandboxed), RLOO over 2 samples per prompt (whitened: rescaled), the SFT blend on the
    # gold answers, KL in the loss. (In the reward, two identical completions of a prompt get advantage +-(the
    # rounding of their KLs' difference), ~1e-6, whose sign decides whether their tokens past the clip range count
    # as clipped: the clip fraction of two ranks and of one process could differ by those tokens.)
    "rft": ("rft", ["update.rollout_batch_size=16", "train.batch_size=8", "train.micro_batch_size=4",
                    "train.max_steps=4", "advantage.estimator=rloo", "sampling.samples_per_prompt=2",
                    "loss.sft_coef=0.5", "kl.coef=0.05", "kl.placement=loss", "kl.kind=k3"]),
    # The batch std over both ranks' rewards, equal-reward groups left out (ranks keep different row counts),
    # KL in the loss, one update per round (no pi_old pass).
    "grpo": ("grpo", ["sampling.samples_per_prompt=4", "train.batch_size=16", "train.micro_batch_size=4",
                      "train.max_steps=2", "advantage.estimator=grpo_batch_std", "advantage.skip_zero_variance=true",
                      "kl.coef=0.1", "reward.functions={dist_residue: 1.0}"]),
    # The rows a round keeps (rejection) and the pairs it makes (on-policy DPO) are of every rank's prompts: each rank
    # trains its slice of steps over all of them (each rank's own rows, sliced again, trained 6 distinct rows of 8).
    "rejection": ("rejection", ["prompts_per_round=8", "sampling.samples_per_prompt=2", "rounds=1",
                                "train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=2",
                                "select.threshold=0.0", "reward.functions={dist_residue: 1.0}"]),
    "dpo-on-policy": ("dpo", ["pairs.source=on_policy", "pairs.prompts_per_round=8", "sampling.samples_per_prompt=4",
                              "train.batch_size=2", "train.micro_batch_size=1", "train.max_steps=2",
                              "reward.functions={dist_residue: 1.0}"]),
    # Per-label metrics over the whole step (each rank once divided its sums by its own label counts).
    "kto": ("kto", ["train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=2"]),
    # Each rank scores its share of the set and every rank trains on all the scores (a grader error on one rank
    # left that row out there alone).
    "rft-offline": ("rft", ["mode=offline", "data.size=8", "train.batch_size=4", "train.micro_batch_size=2",
                            "train.max_steps=2", "reward.functions={dist_flaky_on_rank_1: 1.0}"]),
    # On-policy reward-model pairs: the prompt batches shared out over the ranks (each rank sampled every prompt),
    # every rank training on all the pairs in the one process's order.
    "rm-on-policy": ("rm", ["pairs.source=on_policy", "sampling.samples_per_prompt=4", "pairs.prompts_per_batch=8",
                            "train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=2",
                            "reward.functions={dist_residue: 1.0}"]),
}
# Dynamic sampling: each rank keeps sampling batches until every rank holds its share of groups whose rewards differ
# (about half of PromptEngine's prompts give equal completions), then all train on the same number of groups. Not
# the one-process run (each rank filters its own prompts): it must end, on every rank, after the same batches.
FILTER_RUN = ("grpo", ["sampling.samples_per_prompt=4", "train.batch_size=16", "train.micro_batch_size=4",
                       "train.max_steps=2", "filter.enabled=true", "filter.max_batches=3",
                       "reward.functions={dist_residue: 1.0}"])
FILTER_KEYS = ("prompts_sampled", "sampling_batches", "kept_fraction", "filled_groups", "zero_variance_groups")
RL_KEYS = ("loss", "pg_loss", "value_loss", "sft_loss", "kl", "reward", "entropy", "ratio", "clip_fraction", "kept",
           "chosen_reward", "rejected_reward", "tokens", "reward_std", "advantages", "advantages_std",
           "desirable_reward", "desirable_logprobs", "undesirable_logprobs", "reward_margin",
           "grad_norm")


def _rl_run(stage: str, model_dir: Path, out: Path,
            run: tuple[str, list[str]] | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One RL stage's run with `PromptEngine` (`RL_RUNS`' or `run`): its metrics and its final policy weights (rank
    0's files)."""
    from posttrain.config import load_config
    from posttrain.recipes import STAGES, config_class, rl_loop
    from posttrain.train.metrics import read_metrics

    recipe, overrides = run or (RL_RUNS[stage] if stage in RL_RUNS else FILTER_RUN)
    common = [o for o in _RL_COMMON if (recipe != "kto" or not o.startswith("sampling."))  # KTO samples nothing
              and (recipe != "rm" or not o.startswith("eval"))]  # a reward model's evaluation is of its pairs
    cfg = load_config(config_class(recipe), None, [f"model.path={model_dir}", f"run.out_dir={out}",
                                                   f"run.name={stage}", *common, *overrides])
    stage_module = importlib.import_module(STAGES[recipe][0])
    sampler = rl_loop if recipe in ("ppo", "rft", "grpo") else stage_module  # the module whose sampler it calls
    make_engine = getattr(sampler, "make_engine", None)  # KTO samples nothing
    sampler.make_engine = lambda name, model, tokenizer: PromptEngine(tokenizer)
    try:
        result = stage_module.main(cfg)
    finally:
        if make_engine is None:
            del sampler.make_engine
        else:
            sampler.make_engine = make_engine
    return read_metrics(result.run_dir / "metrics.jsonl"), load_file(str(result.final_dir / "model.safetensors"))


def _worker(rank: int, world: int, port: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_WAIT_POLICY="PASSIVE")
    torch.set_num_threads(1)
    from posttrain.train.dist import init_distributed

    init_distributed()
    work_dir = Path(work)
    out = work_dir / "runs"
    results: dict[str, torch.Tensor] = {}
    for parallel in ("ddp", "fsdp"):
        grads, params = _train(work_dir / "model", out, f"two-{parallel}", steps=2, parallel=parallel)
        results.update({f"{parallel}.grad.{k}": v for k, v in grads.items()})
        results.update({f"{parallel}.param.{k}": v for k, v in params.items()})
    # Checkpoint at step 2 of a 4-step run, then a fresh process state resumes it to step 4. A held-out loss after
    # every step, computed on rank 0 alone from the gathered weights (it built an autograd graph there, and the
    # next step's FSDP collectives no longer matched the other rank's: a gloo size mismatch).
    _, straight = _train(work_dir / "model", out, "straight", steps=4, parallel="fsdp", evaluate=True)
    _train(work_dir / "model", out, "resumed", steps=2, parallel="fsdp", save_every=2, evaluate=True)
    _, resumed = _train(work_dir / "model", out, "resumed", steps=4, parallel="fsdp", resume=True, evaluate=True)
    results.update({f"straight.{k}": v for k, v in straight.items()})
    results.update({f"resumed.{k}": v for k, v in resumed.items()})
    for stage in RL_RUNS:
        PromptEngine.sampled = 0
        metrics, weights = _rl_run(stage, work_dir / "model", out)
        results[f"{stage}.sampled"] = torch.tensor(PromptEngine.sampled)
        if rank == 0:
            results.update({f"{stage}.weight.{k}": v for k, v in weights.items()})
            results.update({f"{stage}.metric.{key}": torch.tensor([m[key] for m in metrics], dtype=torch.float64)
                            for key in RL_KEYS if all(key in m for m in metrics)})
    metrics, weights = _rl_run("grpo-filter", work_dir / "model", out)
    results.update({f"grpo-filter.weight.{k}": v for k, v in weights.items()})
    if rank == 0:
        results.update({f"grpo-filter.metric.{key}": torch.tensor([m[key] for m in metrics], dtype=torch.float64)
                        for key in FILTER_KEYS})
    results.update(_failed_save(work_dir / "model", out, rank))
    results.update(_reward_down_on_one_rank(work_dir / "model", out))
    save_file({k: v.contiguous() for k, v in results.items()}, str(work_dir / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def _failed_save(model_dir: Path, out: Path, rank: int) -> dict[str, torch.Tensor]:
    """A 3-step run saving every step whose checkpoint of step 2 fails on rank 0 (a full disk, as its state.json is
    written): what each rank raised (a RunDirError, as one process's save; rank 0 died with a traceback and rank 1
    with a lost connection), and what was left on disk (the half-written copy stayed on the full disk)."""
    import errno

    from posttrain.errors import RunDirError
    from posttrain.train import dist_checkpoint

    write_json = dist_checkpoint._write_json

    def full_disk(path, record):
        if rank == 0 and path.name == "state.json" and path.parent.name == ".tmp-step-2":
            raise OSError(errno.ENOSPC, "No space left on device")
        write_json(path, record)

    dist_checkpoint._write_json = full_disk
    try:
        _train(model_dir, out, "full-disk", steps=3, parallel="fsdp", save_every=1)
        message = ""
    except RunDirError as err:
        message = str(err)
    finally:
        dist_checkpoint._write_json = write_json
    left = sorted(p.name for p in (out / "full-disk" / "checkpoints").iterdir())
    return {"full-disk.message": torch.tensor(list(message.encode()), dtype=torch.uint8),
            "full-disk.left": torch.tensor(list("/".join(left).encode()), dtype=torch.uint8)}


def _reward_down_on_one_rank(model_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """GRPO whose reward raises on rank 1 alone, half of each round's completions: what each rank raised (rank 1
    stopped alone on its own batch, and rank 0 died in its next collective with gloo's traceback)."""
    from posttrain.errors import ConfigError

    run = ("grpo", ["sampling.samples_per_prompt=4", "train.batch_size=16", "train.micro_batch_size=4",
                    "train.max_steps=2", "reward.functions={dist_down_on_rank_1: 1.0}",
                    "reward.max_error_fraction=0.4"])
    try:
        _rl_run("grpo-reward-down", model_dir, out, run)
        message = ""
    except ConfigError as err:
        message = str(err)
    return {"reward-down.message": torch.tensor(list(message.encode()), dtype=torch.uint8)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_gemm_library():
    """The ranks (1 thread each) and the single process they are compared with pick their fp32 GEMM library by a
    timing measured per thread count (`onednn_linear_preferred`); on a CPU where oneDNN and MKL run about as fast,
    a loaded machine can give the two thread counts different libraries, whose float sums differ enough for AdamW
    to move near-zero-gradient weights apart (seen once in CI, and reproduced by forcing the two apart). The
    comparison is of the distributed arithmetic, so both use torch's own linear."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POSTTRAIN_ONEDNN", "0")  # inherited by the ranks mp.spawn starts
        yield


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tokenizer):
    from posttrain.config import ModelConfig
    from posttrain.models import build_model

    work = tmp_path_factory.mktemp("dist")
    save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer, work / "model")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(work)), nprocs=WORLD, join=True)
    return work, [load_file(str(work / f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(two_ranks):
    work, _ = two_ranks
    return _train(work / "model", work / "single-runs", "one", steps=2)


def _section(results: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(two_ranks, single, parallel):
    """2 ranks x 8 samples == 1 rank x 16: same gradient at step 1, same parameters after 2 AdamW steps."""
    _, ranks = two_ranks
    single_grads, single_params = single
    for results in ranks:  # every rank ends with the same (full) gradients and weights
        grads, params = _section(results, f"{parallel}.grad."), _section(results, f"{parallel}.param.")
        assert grads.keys() == single_grads.keys()
        for name, grad in single_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        for name, value in single_params.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The normaliser is global: halving it (or DDP's averaging left uncorrected) would double the gradient.
    assert any(g.abs().max() > 1e-4 for g in single_grads.values())


def test_sharded_checkpoint_resume_is_bitwise(two_ranks):
    work, ranks = two_ranks
    for results in ranks:
        straight, resumed = _section(results, "straight."), _section(results, "resumed.")
        assert straight.keys() == resumed.keys() and straight
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), name
    checkpoint = work / "runs" / "resumed" / "checkpoints" / "step-2"
    assert (checkpoint / "dcp").is_dir() and (checkpoint / "COMPLETE").is_file()
    assert {p.name for p in checkpoint.glob("rng-*.safetensors")} == {"rng-0.safetensors", "rng-1.safetensors"}
    # Rank 0 alone wrote the metrics: one record per step, each step once.
    lines = (work / "runs" / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4]


def cfg_steps(stage: str) -> int:
    return next(int(o.split("=")[1]) for o in RL_RUNS[stage][1] if o.startswith("train.max_steps="))


@pytest.mark.parametrize("stage", list(RL_RUNS))
def test_rl_stages_on_two_ranks_match_one_process(two_ranks, stage, tmp_path):
    work, ranks = two_ranks
    PromptEngine.sampled = 0
    metrics, weights = _rl_run(stage, work / "model", tmp_path)
    two = ranks[0]
    compared = [key for key in RL_KEYS if f"{stage}.metric.{key}" in two]
    own = (set() if stage == "rft-offline"
           else {"pg_loss", "reward", "reward_std", "advantages_std"} if RL_RUNS[stage][0] in ("ppo", "rft", "grpo")
           else {"kept"} if stage == "rejection" else {"reward_margin", "desirable_logprobs"} if stage == "kto"
           else {"chosen_reward"})
    assert {"loss", "grad_norm", "tokens"} | own <= set(compared)
    for key in compared:  # fp32 sums of O(1) per-token terms in another order: rounding of ~1e-7 per term
        expected = torch.tensor([m[key] for m in metrics], dtype=torch.float64)
        torch.testing.assert_close(two[f"{stage}.metric.{key}"], expected, rtol=1e-5, atol=1e-6, msg=key)
    assert len(metrics) == cfg_steps(stage)
    if stage == "rm-on-policy":  # every prompt sampled once, by one of the ranks
        assert sum(int(r[f"{stage}.sampled"]) for r in ranks) == PromptEngine.sampled > 0
        assert all(0 < int(r[f"{stage}.sampled"]) < PromptEngine.sampled for r in ranks)
    for name, value in weights.items():
        torch.testing.assert_close(two[f"{stage}.weight.{name}"], value, rtol=1e-5, atol=1e-6, msg=name)
    start = load_file(str(work / "model" / "model.safetensors"))
    assert any(not torch.equal(start[name], value) for name, value in weights.items() if name in start)


def test_dynamic_sampling_on_two_ranks_ends_together_and_trains_only_groups_with_spread(two_ranks):
    work, ranks = two_ranks
    metric = _section(ranks[0], "grpo-filter.metric.")
    batches = metric["sampling_batches"]
    assert len(batches) == 2 and bool((batches >= 1).all())
    assert torch.equal(metric["prompts_sampled"], batches * 4)  # 2 prompts per rank per batch, on both ranks
    assert bool((metric["kept_fraction"] > 0).all()) and bool((metric["kept_fraction"] < 1).all())
    # Where nothing had to be filled in, every trained group has a gradient.
    assert bool((metric["zero_variance_groups"][metric["filled_groups"] == 0] == 0).all())
    first, second = (_section(r, "grpo-filter.weight.") for r in ranks)
    assert first and first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(second[name], value), name
    start = load_file(str(work / "model" / "model.safetensors"))
    assert any(not torch.equal(start[name], value) for name, value in first.items() if name in start)


def _cli_worker(rank: int, world: int, port: int, work: str) -> None:
    """`torchrun ... -m posttrain <stage>` as torchrun starts it: no process group before the stage runs."""
    import json

    from posttrain.errors import PosttrainError
    from posttrain.recipes import run_stage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_WAIT_POLICY="PASSIVE")
    torch.set_num_threads(1)
    work_dir = Path(work)
    common = [f"model.path={work_dir / 'model'}", f"run.out_dir={work_dir / 'runs'}", "run.progress=false"]
    sft = [*common, "run.name=cli", "data.size=16", "train.max_steps=2", "train.batch_size=4",
           "train.micro_batch_size=2", "train.save_every=2", "eval.problems=2", "eval_before=false"]
    outcome: dict[str, str] = {}
    for name, stage, overrides in (
        ("trained", "sft", sft),
        ("exists", "sft", sft),  # the run is there: refused on every rank
        # 3 prompts a round cannot split over 2 ranks: refused before any model loads
        ("uneven", "grpo", [*common, "run.name=uneven", "sampling.samples_per_prompt=4", "train.batch_size=12",
                            "train.micro_batch_size=2", "train.max_steps=1"]),
    ):
        try:
            run_stage(stage, None, overrides)
            outcome[name] = "ok"
        except PosttrainError as err:
            outcome[name] = f"{type(err).__name__}: {err}"
    (work_dir / f"cli-rank{rank}.json").write_text(json.dumps(outcome))
    torch.distributed.destroy_process_group()


def test_stages_started_as_torchrun_starts_them_train_and_refuse_on_every_rank(tmp_path, tokenizer):
    """Every rank took the run lock before the process group existed (each thought it was rank 0), so the second
    always failed: no `torchrun -m posttrain <stage>` could start. A refusal must reach every rank (one rank left
    waiting in a collective hangs until torchrun kills it)."""
    import json

    from posttrain.config import ModelConfig
    from posttrain.errors import RunDirError
    from posttrain.models import build_model
    from posttrain.recipes import run_stage

    save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer, tmp_path / "model")
    mp.spawn(_cli_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    outcomes = [json.loads((tmp_path / f"cli-rank{r}.json").read_text()) for r in range(WORLD)]
    for outcome in outcomes:
        assert outcome["trained"] == "ok"
        assert outcome["exists"].startswith("RunDirError") and "a run already exists here" in outcome["exists"]
        assert outcome["uneven"].startswith("ConfigError") and "update.rollout_batch_size" in outcome["uneven"]
        assert "3 prompts of a round" in outcome["uneven"]
    run = tmp_path / "runs" / "cli"
    assert (run / "checkpoints" / "step-2" / "dcp").is_dir() and (run / "final").is_dir()
    assert not (tmp_path / "runs" / "uneven").exists()
    # A 2-rank checkpoint resumed by one plain process: refused up front, the run's config left as it was.
    config = (run / "config.yaml").read_text()
    with pytest.raises(RunDirError, match=r"written by 2 processes .* torchrun --nproc_per_node=2"):
        run_stage("sft", str(run / "config.yaml"), [f"run.out_dir={tmp_path / 'runs'}", "run.name=cli",
                                                     "run.resume=true", "run.overwrite=false", "train.max_steps=4"])
    assert (run / "config.yaml").read_text() == config


def test_a_checkpoint_that_fails_on_one_rank_stops_every_rank_with_the_one_process_error(two_ranks):
    _, ranks = two_ranks
    for rank, results in enumerate(ranks):
        message = bytes(results["full-disk.message"].tolist()).decode()
        assert "cannot write the checkpoint of step 2" in message and "step-1, is kept" in message, message
        assert ("No space left on device" if rank == 0 else "it failed on another rank") in message
        assert bytes(results["full-disk.left"].tolist()).decode() == "step-1"  # no .tmp-step-2 on the full disk


def test_reward_errors_on_one_rank_stop_every_rank_with_the_rounds_one_line_error(two_ranks):
    """reward.max_error_fraction was judged on each rank's own batch: the rank whose function failed stopped alone,
    and the other died in its next collective with gloo's traceback. Judged on the round's rows of every rank now,
    alike on each: 8 of the round's 16 (> 0.4)."""
    _, ranks = two_ranks
    for results in ranks:
        message = bytes(results["reward-down.message"].tolist()).decode()
        assert message.startswith("reward.functions.dist_down_on_rank_1: 8 of 16 scores of this round (every "
                                  "rank's) are errors (more than reward.max_error_fraction=0.4); the first: "
                                  "ConnectionError: the grading service is down on this node"), message


def test_a_runs_summary_names_the_processes_a_resume_must_have_again(two_ranks):
    """summary.json and report.md did not say that the run ran on 2 ranks, which its resume must have again."""
    work, _ = two_ranks
    summary = json.loads((work / "runs" / "grpo" / "summary.json").read_text())["summary"]
    assert (summary["processes"], summary["parallel"]) == (2, "ddp")
    assert "| processes | 2 |" in (work / "runs" / "grpo" / "report.md").read_text()
