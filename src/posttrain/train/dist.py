"""Scale-out with `torchrun`: the process group, DDP or FSDP2 around the model, rank-aware helpers.

Every recipe runs unchanged under `torchrun --nproc_per_node=N -m posttrain <stage> ...`:

- the process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT): gloo on CPU, nccl on GPU; without WORLD_SIZE (or with 1) nothing is initialised and
  every helper here is a no-op, so single-process runs take exactly the code path they always took;
- `train.batch_size` is the *global* batch: each rank takes its contiguous slice of every global
  batch (`rank_slice`), and the step normaliser is the count of the whole global batch, so N ranks
  x B/N samples give the gradient of 1 rank x B (see `DistributedModel`);
- DDP (default) replicates the model; `train.parallel=fsdp` shards parameters, gradients and
  optimizer state with FSDP2 (`fully_shard` on every decoder layer, then on the root);
- only rank 0 writes the run directory, metrics, progress and reports (`is_main_process`).

Gradient scale: DDP and FSDP2 *average* gradients over ranks. A loss divided by the global
normaliser N gives per-rank gradients that must be *summed*, so the Trainer hands loss functions
N / world_size: the average of the ranks' gradients is then exactly sum(all samples) / N.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from posttrain.errors import ConfigError
from posttrain.models.device import default_device, move_to

PARALLEL_MODES = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join the process group torchrun describes in the environment (idempotent); single process without it."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return context()


def context() -> DistContext:
    """Where this process stands: rank, world size and its device (no process group: rank 0 of 1, on its
    `models.device.default_device`)."""
    if not dist.is_initialized():
        return DistContext(device=default_device())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (collective; `value` itself in a single process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_slice(items: list[Any], field: str = "train.batch_size") -> list[Any]:
    """This rank's contiguous share of a global batch (all of it in a single process)."""
    ctx = context()
    if not ctx.distributed:
        return items
    if len(items) % ctx.world_size:
        raise ConfigError(f"the global batch of {len(items)} does not split evenly over {ctx.world_size} ranks",
                          field=field)
    share = len(items) // ctx.world_size
    return items[ctx.rank * share:(ctx.rank + 1) * share]


def resume_command(path: Any) -> str:
    """The command that resumes the run in `path` as this one runs: under torchrun with as many processes (a
    resume with another count is refused), else one plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, also once the process group is gone
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes={world // local} " if world > local else ""
    return (f"torchrun {nodes}--nproc_per_node={local} -m posttrain resume {path}" if world > 1
            else f"posttrain resume {path}")


def all_reduce_sum(value: float) -> float:
    """The sum of `value` over all ranks (float64, so counts stay exact)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context().device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's `tensor` (same shape on every rank) along dim 0, in rank order."""
    if not dist.is_initialized():
        return tensor
    device = context().device
    parts = [torch.empty_like(tensor, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.to(device).contiguous())
    return torch.cat(parts).to(tensor.device)


def all_reduce_max(value: float) -> float:
    """The largest `value` over all ranks."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context().device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_min(value: float) -> float:
    """The smallest `value` over all ranks."""
    return -all_reduce_max(-value)


def rank_span(count: int) -> tuple[int, int]:
    """Where this rank's `count` rows start when every rank's rows are concatenated in rank order, and how
    many rows that makes in all ((0, count) in a single process)."""
    if not dist.is_initialized():
        return 0, count
    counts = all_gather_rows(torch.tensor([count], dtype=torch.long)).tolist()
    return sum(counts[:context().rank]), sum(counts)


def all_gather_ragged(tensor: Tensor) -> tuple[Tensor, int]:
    """Every rank's `tensor` concatenated along dim 0 in rank order, each zero-padded along dim 1 to the
    widest rank's (1- or 2-dim tensors whose sizes may differ between ranks), and the row where this
    rank's part starts. A single process gets its own tensor back, and 0."""
    if not dist.is_initialized():
        return tensor, 0
    ctx = context()
    width = tensor.shape[1] if tensor.dim() > 1 else 0
    shapes = all_gather_rows(torch.tensor([[tensor.shape[0], width]], dtype=torch.long))
    counts = shapes[:, 0].tolist()
    padded = torch.zeros((max(counts), *([int(shapes[:, 1].max())] if tensor.dim() > 1 else [])),
                         dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)  # gloo has no bool
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    parts = all_gather_rows(padded.unsqueeze(0))
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
    return gathered.to(tensor.dtype), sum(counts[:ctx.rank])


def mean_and_std_over_ranks(values: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    """The mean and the unbiased standard deviation (0 for fewer than two values) of every rank's `values` (their
    `mask`ed entries), as one process holding all of them computes them: counts, sums and squared deviations from
    the shared mean added up over the ranks (float64). A mean of the ranks' own standard deviations is not one."""
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    kept = values.detach().double()[keep]
    count = all_reduce_sum(float(kept.numel()))
    mean = all_reduce_sum(kept.sum().item()) / count if count else 0.0
    squares = all_reduce_sum(((kept - mean) ** 2).sum().item())
    return mean, math.sqrt(squares / (count - 1)) if count > 1 else 0.0


def all_gather_list(items: list[Any]) -> list[Any]:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank (`items` in a single process):
    the rows a round's ranks each sampled, as one process would have sampled them all."""
    if not dist.is_initialized():
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def mean_over_ranks(metrics: Mapping[str, float]) -> dict[str, float]:
    """Average each metric over the ranks that report it (rank 0's keys order the result)."""
    if not dist.is_initialized():
        return dict(metrics)
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(metrics))
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for rank_metrics in gathered for k in rank_metrics):
        values = [m[key] for m in gathered if key in m]
        out[key] = sum(values) / len(values)
    return out


def same_on_all_ranks(value: int, what: str) -> None:
    """Raise on every rank when ranks disagree on `value`: a mismatch would deadlock the next collective."""
    if not dist.is_initialized():
        return
    values: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {values}; every rank must run the same number of "
                           "forward/backward passes")


# ----------------------------------------------------------------------------------------------
# The model under DDP or FSDP2.


class LossModule(torch.nn.Module):
    """The model plus the recipe's loss, as one module whose forward is the whole micro-batch loss.

    DDP and FSDP2 hook the forward of the module they wrap. Loss functions call the model in their
    own ways (a reward model runs its trunk and head separately), so the wrapped forward is the loss
    function itself: every call inside it is covered, and loss functions receive the plain model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[..., tuple[Tensor, dict[str, float]]], batch: Any,
                normaliser: float) -> tuple[Tensor, dict[str, float]]:
        return loss_fn(self.model, batch, normaliser)


class DistributedModel:
    """Runs micro-batch losses through DDP / FSDP2 (or directly in a single process).

    `loss(loss_fn, batch, normaliser, sync)` returns the micro-batch loss; gradients are exchanged only
    on the backward of a `sync=True` micro-batch (the last of a step), as with DDP's `no_sync`.
    """

    def __init__(self, model: torch.nn.Module, mode: str = "ddp") -> None:
        if mode not in PARALLEL_MODES:
            raise ConfigError(f"unknown parallel mode {mode!r}; choose one of {', '.join(PARALLEL_MODES)}",
                              field="train.parallel")
        self.ctx = context()
        self.model = model
        self.mode = mode if self.ctx.distributed else "none"
        self.root = LossModule(model)
        self._engine: torch.nn.Module = self.root
        model.to(self.ctx.device)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # The constructor broadcasts rank 0's parameters: every replica starts identical.
            self._engine = DistributedDataParallel(
                self.root, device_ids=[self.ctx.local_rank] if self.ctx.device.type == "cuda" else None)
        elif self.mode == "fsdp":
            self._shard(model)

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        if hasattr(model, "peft_config"):
            raise ConfigError("train.parallel=fsdp shards full fine-tuning; an adapter's trainable weights are "
                              "small enough to replicate: use train.parallel=ddp", field="train.parallel")
        # Rank 0's weights everywhere first: fully_shard keeps each rank's own slice of its local tensor.
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        for module in list(model.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module)
        fully_shard(self.root)
        # FSDP2 picks its root at the first forward; sampling may call a layer before any training
        # forward, so settle it now on the LossModule.
        self.root._get_fsdp_state()._lazy_init()

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def loss(self, loss_fn: Callable[..., tuple[Tensor, dict[str, float]]], batch: Any, normaliser: float,
             sync: bool) -> tuple[Tensor, dict[str, float]]:
        batch = move_to(batch, self.ctx.device)
        if self.mode == "fsdp":
            self.root.set_requires_gradient_sync(sync)
        return self._engine(loss_fn, batch, normaliser / self.ctx.world_size)

    @contextlib.contextmanager
    def step_context(self, sync: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: DDP skips the all-reduce unless `sync`."""
        if self.mode == "ddp" and not sync:
            with self._engine.no_sync():
                yield
        else:
            yield

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Inside, the model holds its full (unsharded) weights and runs like a plain module: for sampling
        and evaluation under FSDP, which read weights directly. Collective: every rank must enter."""
        if self.mode != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        # The root's hooks never run here (the model is called, not the LossModule): only the layers'
        # post-forward reshard has to be held off while the weights are whole.
        layers = [m for m in self.root.modules() if isinstance(m, FSDPModule) and m is not self.root]
        for module in [self.root, *layers]:
            module.unshard()
        for module in layers:
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for module in layers:
                module.set_reshard_after_forward(True, recurse=False)
            for module in [self.root, *layers]:
                module.reshard()
            _forget_forwards([self.root, *layers])


def _forget_forwards(modules: list[torch.nn.Module]) -> None:
    """FSDP2 records each layer forward that runs outside a backward, for the next backward to prefetch the layer
    before (`post_forward_order`); a backward's end clears the records. Forwards of sampling and evaluation have no
    backward: the next training backward prefetched one of their layers, an all-gather that a rank which had not
    run them (evaluation runs on rank 0 alone) never joined. Their records are dropped here (FSDP2's private
    state in torch 2.13: `_post_forward_indices` of each parameter group, the shared `post_forward_order`)."""
    for module in modules:
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            group._post_forward_indices.clear()
        comm = getattr(state, "_comm_ctx", None)
        if comm is not None:
            comm.post_forward_order.clear()


def grad_norm_value(norm: Tensor) -> float:
    """A scalar tensor (a norm, or a coefficient computed from one) as a float; a DTensor under FSDP2 is made whole
    first."""
    full = getattr(norm, "full_tensor", None)
    return float((full() if full is not None else norm).item())
