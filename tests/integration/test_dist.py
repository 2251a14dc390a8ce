"""Scale-out on CPU: 2 gloo processes against the same work done by one process.

One spawn of 2 ranks runs every distributed scenario (process start-up is most of the cost) and
writes its results to files; each test compares one of them with a single-process reference
computed here, in the pytest process:

- DDP: 2 ranks x 8 samples (2 micro-batches each) give the gradients of 1 rank x 16;
- FSDP2: the same optimizer steps, with sharded parameters, gradients and optimizer state;
- a sharded (DCP) checkpoint saved at step 2 and resumed gives bitwise the parameters of an
  uninterrupted 4-step run;
- GRPO group statistics with each rank holding half the groups equal the single-batch ones.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from posttrain.algos import group_advantages
from posttrain.config import OptimConfig, RunConfig, param, section
from posttrain.models.io import load_causal_lm, save_pretrained
from posttrain.recipes.sft import sft_loss_fn
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
           resume: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`steps` optimizer steps of the SFT loss; returns (gradients of the first step, final parameters)."""
    model = load_causal_lm(model_dir)
    train = TrainConfig(max_steps=steps, batch_size=SAMPLES, micro_batch_size=4, save_every=save_every,
                        parallel=parallel)
    cfg = _Config(run=RunConfig(name=name, out_dir=str(out), progress=False, overwrite=not resume, resume=resume),
                  train=train, optim=OptimConfig(lr=1e-3, schedule="constant"))
    trainer = Trainer(stage="sft", cfg=cfg, run=cfg.run, train=train, optim=cfg.optim,
                      run_dir=prepare_run_dir(cfg.run, cfg, "sft"), model=model)
    grads: dict[str, torch.Tensor] = {}

    def record_first_gradients(*_):
        if not grads:  # collective under FSDP (full_tensor): every rank records
            grads.update({n: _full(p.grad) for n, p in model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(record_first_gradients)
    trainer.fit(_source(_samples(model.config.vocab_size), train), sft_loss_fn)
    return grads, {n: _full(p) for n, p in model.named_parameters()}


def _grpo_statistics(rank: int, world: int) -> dict[str, torch.Tensor]:
    from posttrain.train.dist import outcome_advantages

    rewards, groups = _grpo_batch()
    share = len(rewards) // world
    mine = slice(rank * share, (rank + 1) * share)
    return {scale: outcome_advantages(rewards[mine], groups[mine], scale, eps=1e-6) for scale in ("group", "batch")}


def _grpo_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 groups of 4 completions; each rank holds 2 whole groups (local group ids restart at 0)."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.9, 0.4, 1.0, 1.0, 1.0, 1.0])
    return rewards, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])


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
    # Checkpoint at step 2 of a 4-step run, then a fresh process state resumes it to step 4.
    _, straight = _train(work_dir / "model", out, "straight", steps=4, parallel="fsdp")
    _train(work_dir / "model", out, "resumed", steps=2, parallel="fsdp", save_every=2)
    _, resumed = _train(work_dir / "model", out, "resumed", steps=4, parallel="fsdp", resume=True)
    results.update({f"straight.{k}": v for k, v in straight.items()})
    results.update({f"resumed.{k}": v for k, v in resumed.items()})
    results.update({f"grpo.{k}": v for k, v in _grpo_statistics(rank, world).items()})
    save_file({k: v.contiguous() for k, v in results.items()}, str(work_dir / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_grpo_group_statistics_across_ranks(two_ranks):
    """Each rank holds whole groups: group-scaled advantages stay local, the batch std is global."""
    _, ranks = two_ranks
    rewards, groups = _grpo_batch()
    global_groups = groups + torch.arange(len(groups)) // 8 * 2  # rank 1's groups are 2 and 3
    for scale in ("group", "batch"):
        expected = group_advantages(rewards, global_groups, scale=scale, eps=1e-6)
        got = torch.cat([ranks[r][f"grpo.{scale}"] for r in range(WORLD)])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    # By hand, group 0 = [1, 0, 0.5, 1]: mean 0.625, unbiased std 0.478714; batch std over all 16 rewards.
    assert ranks[0]["grpo.group"][0].item() == pytest.approx(0.375 / (0.4787135538781691 + 1e-6), rel=1e-6)
    assert ranks[0]["grpo.batch"][0].item() == pytest.approx(0.375 / (rewards.std().item() + 1e-6), rel=1e-6)
