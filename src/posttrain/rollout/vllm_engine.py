"""The vLLM rollout engine: a colocated `vllm.LLM` on each rank's GPU, synced from the policy after updates.

`rollout.engine=vllm` / `sampling.engine=vllm` (extra: `pip install 'posttrain[vllm]'`, CUDA needed).

- Colocated: every rank (torchrun) holds its own engine on its own GPU next to the trainer
  (`distributed_executor_backend="external_launcher"`, as TRL's colocate mode), sampling its own
  share of the prompts. `gpu_memory_utilization` caps the engine's share of the GPU; with `sleep`
  the engine releases its KV cache and offloads its weights between generation rounds
  (`LLM.sleep(level=1)` / `wake_up()`), so training gets the memory back.
- Weights: `update_weights(model)` streams the policy's parameters into the engine's model through
  its `load_weights` (in-process worker: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), merging a LoRA adapter
  and gathering FSDP shards first, then resets the prefix cache (cached KV came from old weights).
- Logprobs: the sampler's logprob of each sampled token, under the temperature-scaled distribution
  (`logprobs_mode="processed_logprobs"`); with top-k / top-p vLLM reports the truncated distribution
  while the trainer recomputes the full one, which the recipes' `logprob_mismatch` metric shows.

Nothing here runs without vLLM and a GPU: `check_vllm_available` turns either absence into a
`ConfigError`. The conversion of vLLM's outputs into a `Rollout` (`rollout_from_outputs`) is plain
Python and is tested on CPU with outputs shaped like vLLM's.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.tokenize import turn_end_ids
from posttrain.errors import ConfigError
from posttrain.rollout.base import FinishReason, Prompts, Rollout, RolloutEngine, SamplingParams
from posttrain.rollout.forward import left_pad, prompt_learning
from posttrain.rollout.local import prompt_token_lists


def check_vllm_available(field: str = "engine") -> None:
    """A `ConfigError` naming what is missing when vLLM cannot run here (never a silent fallback)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("the vLLM rollout engine needs vLLM: pip install 'posttrain[vllm]' (Linux, CUDA GPU); "
                          "or use the in-process engine ('local')", field=field)
    if not torch.cuda.is_available():
        raise ConfigError("the vLLM rollout engine needs a CUDA GPU and none is visible here; use 'local'",
                          field=field)


@dataclass(frozen=True)
class Completion:
    """One sampled completion as vLLM reports it (`CompletionOutput`), reduced to what a Rollout needs."""

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    finish_reason: str | None
    """vLLM's: "length", or "stop" (EOS, a stop token or a stop string)."""
    stop_reason: int | str | None
    """vLLM's: None when EOS ended it, else the stop token id or stop string."""
    text: str


def finish_reason(completion: Completion, turn_ends: frozenset[int] = frozenset()) -> FinishReason:
    """The local engine's reason: a chat template's end-of-turn token (passed to vLLM as a stop token) ends the
    answer as EOS does."""
    if completion.finish_reason == "length":
        return "length"
    return "eos" if completion.stop_reason is None or completion.stop_reason in turn_ends else "stop"


def rollout_from_outputs(prompts: list[list[int]], completions: list[list[Completion]], pad_id: int,
                         temperature: float, turn_ends: frozenset[int] = frozenset()) -> Rollout:
    """A prompt-major `Rollout` from each prompt's completions (the layout the local engine produces)."""
    rows = [(p, c) for p, group in enumerate(completions) for c in group]
    width = max(1, max(len(c.token_ids) for _, c in rows))
    completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (_, completion) in enumerate(rows):
        n = len(completion.token_ids)
        completion_ids[i, :n] = torch.tensor(list(completion.token_ids), dtype=torch.long)
        response_mask[i, :n] = 1
        logprobs[i, :n] = torch.tensor(list(completion.logprobs), dtype=torch.float32)
    prompt_index = torch.tensor([p for p, _ in rows], dtype=torch.long)
    prompt_ids, prompt_mask = left_pad([prompts[p] for p, _ in rows], pad_id)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   response_mask=response_mask, logprobs=logprobs,
                   finish_reasons=[finish_reason(c, turn_ends) for _, c in rows], texts=[c.text for _, c in rows],
                   prompt_index=prompt_index, temperature=temperature)


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Any]] | None) -> list[float]:
    """The sampled token's logprob at each position, from vLLM's per-position {token id: Logprob} dicts."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs: SamplingParams(logprobs=0) must be set")
    return [float(position[token].logprob) for token, position in zip(token_ids, logprobs, strict=True)]


def prompt_seeds(count: int, params: SamplingParams, generator: torch.Generator | None) -> list[int | None]:
    """One seed per prompt (None: vLLM's own random stream): vLLM seeds sample j of a request `seed + j`, so one
    seed for every prompt would draw the same completions for equal prompts and correlated ones for the others.
    Prompt i's n samples get seeds base + i*n ... base + i*n + n - 1, all distinct. The caller's generator draws
    the base (the round stays reproducible), else it is `params.seed` (the local engine's precedence too); with
    neither, no seeds. `params.prompt_seeds` come first: prompt i's seed s gives its samples s*n ... s*n + n - 1,
    whichever prompts share the call."""
    params.check_prompt_seeds(count)
    if params.prompt_seeds is not None:
        return [(seed * params.n) % 2**63 for seed in params.prompt_seeds]
    base = params.seed
    if generator is not None:
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return [None if base is None else (base + i * params.n) % 2**63 for i in range(count)]


class VLLMRolloutEngine(RolloutEngine):
    """Samples with a colocated vLLM engine; `update_weights` copies the policy's weights into it."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                 gpu_memory_utilization: float = 0.3, sleep: bool = True, max_model_len: int | None = None,
                 seed: int = 0) -> None:
        check_vllm_available()
        if prompt_learning(model) is not None:
            # Its virtual tokens are no weights vLLM's model has: the engine would sample the base model, silently.
            raise ConfigError("the vLLM rollout engine cannot sample a prefix- or prompt-tuned policy (vLLM's model "
                              "has no virtual tokens); use the 'local' engine or LoRA", field="engine")
        # The engine's worker then lives in this process, so `load_weights` receives tensors directly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch.distributed as dist
        from vllm import LLM

        self.tokenizer, self.sleep = tokenizer, sleep
        self.turn_ends = turn_end_ids(tokenizer)  # vLLM stops at EOS alone (see `LocalRolloutEngine.eos_token_ids`)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        self._snapshot = None if _model_dir(model) else tempfile.TemporaryDirectory(prefix="posttrain-vllm-")
        path = _model_dir(model) or _save_snapshot(model, tokenizer, Path(self._snapshot.name))
        dtype = next(model.parameters()).dtype
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=str(dtype).removeprefix("torch."),
                       gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                       max_model_len=max_model_len, seed=seed + rank, logprobs_mode="processed_logprobs",
                       distributed_executor_backend="external_launcher" if distributed else None)
        self.asleep = False
        self.update_weights(model)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine (every rank calls it: FSDP gathers shards).

        `generate` calls it itself before every round after the first, from the policy it was built
        with: the optimizer updates that module in place, so a round always samples the current policy.
        """
        self.model, self.stale = model, False
        self._wake()
        # Loaded inside the context: a LoRA policy's merged weights are views of its base weights, which
        # leaving the context unmerges in place (loading after it sent the base model, not the policy).
        with policy_weights(model) as weights:

            def load(worker: Any) -> None:
                worker.model_runner.model.load_weights(weights=iter(weights))

            self.llm.collective_rpc(load)
        self.llm.reset_prefix_cache()
        self._rest()

    def generate(self, prompts: Prompts, params: SamplingParams, generator: torch.Generator | None = None) -> Rollout:
        from vllm import SamplingParams as VLLMSamplingParams

        if self.stale:
            self.update_weights(self.model)
        self.stale = True  # the trainer may update the policy before the next round
        prompt_lists = prompt_token_lists(prompts)
        sampling = [VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p, max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
            include_stop_str_in_output=True,  # a completion's text ends with its stop string, as the local engine's
            stop_token_ids=sorted({*params.stop_token_ids, *self.turn_ends}) or None, logprobs=0, seed=seed)
            for seed in prompt_seeds(len(prompt_lists), params, generator)]
        self._wake()
        try:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_lists], sampling, use_tqdm=False)
        finally:
            self._rest()
        completions = [[Completion(token_ids=list(c.token_ids), logprobs=sampled_logprobs(c.token_ids, c.logprobs),
                                   finish_reason=c.finish_reason, stop_reason=c.stop_reason, text=c.text)
                        for c in output.outputs] for output in outputs]
        return rollout_from_outputs(prompt_lists, completions, self.pad_id, params.logprob_temperature,
                                    self.turn_ends)

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _rest(self) -> None:
        """Between rounds: offload weights and drop the KV cache, so the trainer has the GPU memory."""
        if self.sleep:
            self.llm.sleep(level=1)
            self.asleep = True


def _model_dir(model: torch.nn.Module) -> Path | None:
    """The directory the policy was loaded from, when it still holds a loadable config (vLLM reads it)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(name) if name and (Path(name) / "config.json").is_file() else None


def _save_snapshot(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    from posttrain.models.io import save_pretrained

    return save_pretrained(model, tokenizer, directory)


@contextmanager
def policy_weights(model: torch.nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, full tensor) pairs in the Hugging Face naming vLLM's `load_weights` expects, valid inside the
    context only.

    A LoRA policy is merged (W + BA * alpha / r) for the context and unmerged in place when it ends, so the
    merged tensors (views of the base weights, not copies: no second copy of the model) must be consumed
    inside it. FSDP2 shards are gathered (`full_tensor`, a collective every rank runs in the same order).
    """
    merged = hasattr(model, "merge_adapter")
    if merged:
        model.merge_adapter()
    try:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        weights = []
        for name, tensor in inner.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            full = getattr(tensor, "full_tensor", None)
            weights.append((name.replace("base_layer.", ""), (full() if full is not None else tensor).detach()))
        yield weights
    finally:
        if merged:
            model.unmerge_adapter()
