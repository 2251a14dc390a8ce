"""Rollouts for the RL stages: batched sampling with a KV cache, stop handling and logprob bookkeeping.

`make_engine("local", model, tokenizer).generate(prompts, SamplingParams(...))` returns a `Rollout`;
`policy_logprobs` recomputes its logprobs on the trainer's side, `logprob_mismatch` compares the two.
"""

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.errors import ConfigError
from posttrain.rollout.base import (
    FinishReason,
    Prompts,
    Rollout,
    RolloutEngine,
    SamplingParams,
    concat_rollouts,
    position_ids_from_mask,
    text_rollout,
)
from posttrain.rollout.local import LocalRolloutEngine
from posttrain.rollout.recompute import logprob_mismatch, policy_logprobs, policy_logprobs_and_entropy

ENGINES = ("local", "vllm")


def make_engine(name: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, **options) -> RolloutEngine:
    """The rollout engine called `name`: "local" samples in-process; "vllm" with a colocated vLLM engine
    (`options`: gpu_memory_utilization, sleep, max_model_len, seed; see `posttrain.rollout.vllm_engine`).

    Asking for vLLM where it cannot run (not installed, no GPU) is a `ConfigError`, never a silent
    fallback to the local engine: the two differ in speed by an order of magnitude on a GPU, and a
    run should not quietly be the slow one.
    """
    if name == "local":
        return LocalRolloutEngine(model, tokenizer)
    if name == "vllm":
        from posttrain.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(model, tokenizer, **options)
    raise ConfigError(f"unknown rollout engine {name!r}; choose one of: {', '.join(ENGINES)}", field="engine")


__all__ = ["ENGINES", "FinishReason", "LocalRolloutEngine", "Prompts", "Rollout", "RolloutEngine", "SamplingParams",
           "concat_rollouts", "logprob_mismatch", "make_engine", "policy_logprobs", "policy_logprobs_and_entropy",
           "position_ids_from_mask", "text_rollout"]
