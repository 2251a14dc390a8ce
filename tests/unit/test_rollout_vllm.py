"""The vLLM rollout engine: clear errors where it cannot run, and vLLM outputs turned into a Rollout."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout import SamplingParams, make_engine, policy_logprobs
from posttrain.rollout.vllm_engine import Completion, rollout_from_outputs, sampled_logprobs

HAS_VLLM_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def test_vllm_without_vllm_is_a_config_error(monkeypatch, tiny_model, tokenizer):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(ConfigError, match=r"needs vLLM: pip install 'posttrain\[vllm\]'"):
        make_engine("vllm", tiny_model, tokenizer)


def test_vllm_without_a_gpu_is_a_config_error(monkeypatch, tiny_model, tokenizer):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        make_engine("vllm", tiny_model, tokenizer)


def test_rollout_from_vllm_outputs():
    """Two prompts x two completions: prompt-major rows, left-padded prompts, right-padded completions."""
    prompts = [[5, 6, 7], [8]]
    completions = [
        [Completion([10, 2], [-0.5, -0.25], "stop", None, "a"), Completion([11, 12, 13], [-1.0, -2.0, -3.0], "length",
                                                                            None, "bcd")],
        [Completion([14], [-0.125], "stop", 99, "e"), Completion([15, 16], [-0.75, -1.5], "stop", "\n", "f")],
    ]
    rollout = rollout_from_outputs(prompts, completions, pad_id=0, temperature=0.7)
    assert rollout.prompt_index.tolist() == [0, 0, 1, 1]
    assert rollout.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert rollout.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert rollout.completion_ids.tolist() == [[10, 2, 0], [11, 12, 13], [14, 0, 0], [15, 16, 0]]
    assert rollout.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert rollout.logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0], [-0.125, 0.0, 0.0],
                                         [-0.75, -1.5, 0.0]]
    # EOS (no stop reason), cut at max_tokens, a stop token id, a stop string.
    assert rollout.finish_reasons == ["eos", "length", "stop", "stop"]
    assert rollout.texts == ["a", "bcd", "e", "f"] and rollout.temperature == 0.7
    # A chat template's end-of-turn token, a stop token for vLLM, ends the answer as EOS does (as the local engine's).
    ended = rollout_from_outputs(prompts, completions, pad_id=0, temperature=0.7, turn_ends=frozenset({99}))
    assert ended.finish_reasons == ["eos", "length", "eos", "stop"]


def test_sampled_logprobs_pick_the_sampled_token():
    logprob = lambda x: SimpleNamespace(logprob=x)  # noqa: E731 - vLLM's Logprob has more fields
    positions = [{3: logprob(-0.1), 9: logprob(-2.0)}, {4: logprob(-0.7)}]
    assert sampled_logprobs([3, 4], positions) == [-0.1, -0.7]
    with pytest.raises(RuntimeError, match="logprobs=0"):
        sampled_logprobs([3], None)


@pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs vLLM and a CUDA GPU (pip install 'posttrain[vllm]'); "
                                              "neither is available on the CPU test machine")
def test_vllm_engine_matches_the_policy(tmp_path, tiny_model, tokenizer):  # pragma: no cover - GPU only
    from posttrain.models.io import save_pretrained

    save_pretrained(tiny_model, tokenizer, tmp_path / "policy")
    model = tiny_model.cuda()
    model.config._name_or_path = str(tmp_path / "policy")
    engine = make_engine("vllm", model, tokenizer, gpu_memory_utilization=0.2)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=4)
    rollout = engine.generate([tokenizer("1 + 1 =")["input_ids"]], params, generator=torch.Generator().manual_seed(0))
    assert rollout.completion_ids.shape[0] == 4
    from posttrain.train.dist import move_to

    recomputed = policy_logprobs(model, move_to(rollout, torch.device("cuda"))).float().cpu()
    mask = rollout.response_mask.bool()
    assert (recomputed[mask] - rollout.logprobs[mask]).abs().max() < 0.05
    # After an update the engine samples from the new weights: greedy answers follow the policy.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    engine.update_weights(model)
    greedy = engine.generate([[5, 6]], SamplingParams(max_new_tokens=4, temperature=0))
    local = make_engine("local", model, tokenizer).generate([[5, 6]], SamplingParams(max_new_tokens=4, temperature=0))
    assert greedy.completion_ids.tolist() == local.completion_ids.tolist()


def test_vllm_engine_loads_the_merged_lora_policy(tiny_model, tokenizer):
    """`update_weights` must hand vLLM W + B A * alpha / r for every adapted layer, not the base weight W (the
    adapter is unmerged in place afterwards, and the merged tensors are views of W), and leave the policy as it was."""
    from posttrain.models.adapters import AdapterConfig, apply_adapter
    from posttrain.rollout.vllm_engine import VLLMRolloutEngine

    policy = apply_adapter(tiny_model, AdapterConfig(method="lora", r=4, alpha=8.0))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj
    base = q_proj.base_layer.weight.detach().clone()
    expected = base + 2.0 * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight  # alpha / r = 2
    received = {}

    def collective_rpc(load):
        load(SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(
            load_weights=lambda weights: received.update({n: t.clone() for n, t in weights})))))

    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)
    engine.sleep, engine.asleep = False, False
    engine.llm = SimpleNamespace(collective_rpc=collective_rpc, reset_prefix_cache=lambda: None)
    engine.update_weights(policy)

    sent = received["model.layers.0.self_attn.q_proj.weight"]
    assert (expected - base).abs().max() > 0.1
    torch.testing.assert_close(sent, expected, rtol=1e-5, atol=1e-5)
    assert not any("lora_" in name for name in received)
    torch.testing.assert_close(q_proj.base_layer.weight, base, rtol=0, atol=1e-6)  # unmerged again
    assert not q_proj.merged


def _fake_engine(monkeypatch, calls: list) -> object:
    """A VLLMRolloutEngine over a stand-in `vllm.LLM` that records what `generate` asks of it and answers with one
    completion "x</a>" per sample (vLLM itself needs a GPU)."""
    from posttrain.rollout.vllm_engine import VLLMRolloutEngine

    monkeypatch.setitem(__import__("sys").modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))

    def generate(prompts, sampling, use_tqdm):
        calls.append((prompts, sampling))
        logprob = {7: SimpleNamespace(logprob=-0.5)}
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7], logprobs=[logprob], finish_reason="stop",
                                                         stop_reason="</a>", text="x</a>")] * params["n"])
                for prompt, params in zip(prompts, sampling, strict=True)]

    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)
    engine.sleep, engine.asleep, engine.stale, engine.pad_id = False, False, False, 0
    engine.turn_ends = frozenset({3})  # a chat template's end of turn that is not EOS (`turn_end_ids`)
    engine.llm = SimpleNamespace(generate=generate)
    engine.model, engine.update_weights = None, lambda model: None  # rounds after the first sync the policy first
    return engine


def test_vllm_engine_seeds_each_prompt_apart_and_keeps_the_stop_string(monkeypatch):
    """vLLM seeds sample j of a request `seed + j`: one seed for the whole batch drew the same completions for
    the same prompt (and correlated ones across prompts). And its default cuts the stop string off the text,
    where the local engine keeps it (a reward reading "</answer>" would score the engines differently)."""
    calls = []
    engine = _fake_engine(monkeypatch, calls)
    params = SamplingParams(max_new_tokens=4, n=3, stop=("</a>",))
    rollout = engine.generate([[5, 6], [9], [5, 6]], params, generator=torch.Generator().manual_seed(0))
    (prompts, sampling), = calls
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [9]}, {"prompt_token_ids": [5, 6]}]
    seeds = [p["seed"] + j for p in sampling for j in range(p["n"])]  # what vLLM gives each sample
    assert len(set(seeds)) == 9 and all(p["include_stop_str_in_output"] for p in sampling)
    assert all(p["stop_token_ids"] == [3] for p in sampling)  # vLLM stops at EOS alone otherwise
    assert rollout.texts == ["x</a>"] * 9
    # Reproducible: the same generator state gives the same seeds; params.seed alone gives its own.
    engine.generate([[5, 6], [9], [5, 6]], params, generator=torch.Generator().manual_seed(0))
    assert [p["seed"] for p in calls[1][1]] == [p["seed"] for p in sampling]
    engine.generate([[5], [6]], SamplingParams(n=2, seed=100))
    assert [p["seed"] for p in calls[2][1]] == [100, 102]
    engine.generate([[5], [6]], SamplingParams(n=2))
    assert [p["seed"] for p in calls[3][1]] == [None, None]  # vLLM's own random stream


def test_vllm_engine_refuses_a_prefix_tuned_policy(monkeypatch, tiny_model, tokenizer):
    """vLLM's model has no virtual tokens: it sampled the base model, silently (nothing to merge)."""
    from posttrain.models.adapters import AdapterConfig, apply_adapter

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    prefixed = apply_adapter(tiny_model, AdapterConfig(method="prefix", num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="cannot sample a prefix- or prompt-tuned policy"):
        make_engine("vllm", prefixed, tokenizer)


def test_an_rl_run_asking_for_vllm_where_it_cannot_run_is_refused_before_the_model_loads(monkeypatch):
    """It was refused by make_engine, after the starting model's whole held-out evaluation, naming `engine`."""
    from posttrain.config import load_config
    from posttrain.recipes import find_recipe
    from posttrain.recipes.grpo import GRPOConfig
    from posttrain.recipes.rl import check_rl_config

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cfg = load_config(GRPOConfig, find_recipe("grpo").path, ["model.path=unused", "sampling.engine=vllm"])
    with pytest.raises(ConfigError, match="needs vLLM") as err:
        check_rl_config(cfg, "grpo")
    assert err.value.field == "sampling.engine"


def test_vllm_request_seeds_keep_each_prompt_s_samples_apart_and_follow_its_own_seed():
    from posttrain.rollout.vllm_engine import prompt_seeds

    # vLLM draws sample j of a request from seed + j: prompt i's n samples take seeds [base + i n, base + i n + n).
    assert prompt_seeds(3, SamplingParams(n=4, seed=100), None) == [100, 104, 108]
    assert prompt_seeds(2, SamplingParams(n=4), None) == [None, None]
    # Seeds of the prompts' own: a prompt's requests are seeded by its seed alone, whichever prompts share the call.
    assert prompt_seeds(2, SamplingParams(n=3, seed=100, prompt_seeds=(5, 9)), None) == [15, 27]
    with pytest.raises(ValueError, match="prompt_seeds has 2 seeds for 3 prompts"):
        prompt_seeds(3, SamplingParams(n=3, prompt_seeds=(5, 9)), None)
