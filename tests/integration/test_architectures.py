"""Recipes on models other than Llama.

Dropout, on a tiny GPT-2 whose every dropout is 0.1: by default GRPO's first update has a ratio of exactly 1
and sampler and trainer agree, and DPO's step-1 implicit rewards are 0 (the policy is its reference); with
`model.disable_dropout=false` the model's dropout stays, and none of that holds.

Sliding windows, on a tiny Mistral with a window of 4: GRPO's padding-free forward (the default) gives the
sampler's logprobs, as the padded one does. A norm of each head's query and key, on a tiny Qwen3: the rollout
engine samples it through its own Llama decoder, and the trainer's forward gives the same logprobs."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from posttrain.config import load_config
from posttrain.models import save_pretrained
from posttrain.recipes import find_recipe
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.dpo import main as dpo_main
from posttrain.recipes.grpo import GRPOConfig
from posttrain.recipes.grpo import main as grpo_main
from posttrain.rewards.functions import register_reward_function
from posttrain.rollout.forward import supports_llama_decoder
from posttrain.train.metrics import read_metrics

FAST = ["run.progress=false", "train.save_every=0", "eval.problems=2", "eval.samples=1", "eval.max_new_tokens=4",
        "eval_before=false", "train.max_steps=1", "data.size=8"]

# A reward of the completion text alone, different for nearly every completion: no group has equal rewards.
register_reward_function("test_dropout_text_hash")(
    lambda batch: [float(zlib.crc32(t.encode()) % 97) for t in batch.completions])


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("gpt2") / "gpt2"))


@pytest.mark.parametrize("disable", [True, False])
@pytest.mark.parametrize("epochs", [1, 2])
def test_grpo_starts_at_ratio_one_with_sampler_and_trainer_agreeing(gpt2_dir, tmp_path, disable, epochs):
    """One epoch: the update's own (train-mode) forward is pi_old, and is compared with the sampler's logprobs.
    Two: pi_old is an eval-mode pass of its own, and the first update's ratio compares it with the train-mode one."""
    cfg = load_config(GRPOConfig, find_recipe("grpo").path, [
        f"model.path={gpt2_dir}", f"run.out_dir={tmp_path}", *FAST, f"model.disable_dropout={disable}",
        "train.batch_size=8", "train.micro_batch_size=8", "sampling.samples_per_prompt=4",
        "sampling.max_new_tokens=6", "reward.functions={test_dropout_text_hash: 1.0}", f"update.epochs={epochs}"])
    first = read_metrics(grpo_main(cfg).run_dir / "metrics.jsonl")[0]
    if disable:
        assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0 and first["logprob_mismatch"] < 1e-5
    elif epochs == 1:
        assert first["logprob_mismatch"] > 1e-3
    else:
        assert first["ratio"] != 1.0 and first["approx_kl"] > 0


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_implicit_rewards_start_at_zero(gpt2_dir, tmp_path, disable):
    cfg = load_config(DPOConfig, find_recipe("dpo").path, [
        f"model.path={gpt2_dir}", f"run.out_dir={tmp_path}", *FAST, f"model.disable_dropout={disable}",
        "train.batch_size=4", "train.micro_batch_size=4", "loss.sft_weight=0"])
    first = read_metrics(dpo_main(cfg).run_dir / "metrics.jsonl")[0]
    rewards = torch.tensor([first["chosen_reward"], first["rejected_reward"]])
    if disable:
        # The cached reference logprobs come from another batch layout: equal up to float rounding.
        assert_close(rewards, torch.zeros(2))
    else:
        assert rewards.abs().max() > 1e-3


def _save_tiny(tokenizer, directory, model_cls, config_cls, **config):
    """A seeded tiny two-layer model of `model_cls` with grouped-query attention, saved with the project tokenizer."""
    torch.manual_seed(0)
    model = model_cls(config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config))
    for name, module in model.named_modules():
        if name.endswith(("q_norm", "k_norm")):  # Qwen3's: an initial RMSNorm weight of 1 would hide a missing norm
            torch.nn.init.normal_(module.weight, 1.0, 0.5)
    return model, str(save_pretrained(model, tokenizer, directory))


@pytest.fixture(scope="module")
def mistral_dir(tokenizer, tmp_path_factory):
    return _save_tiny(tokenizer, tmp_path_factory.mktemp("mistral") / "mistral", MistralForCausalLM, MistralConfig,
                      sliding_window=4)[1]


@pytest.fixture(scope="module")
def qwen3_dir(tokenizer, tmp_path_factory):
    model, directory = _save_tiny(tokenizer, tmp_path_factory.mktemp("qwen3") / "qwen3", Qwen3ForCausalLM,
                                  Qwen3Config, head_dim=16)
    assert supports_llama_decoder(model, 512)  # sampled by the engine's own decoder, trained by the model's forward
    return directory


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("model_dir", ["mistral_dir", "qwen3_dir"])
def test_grpo_on_other_llama_like_models_agrees_with_the_sampler(request, model_dir, tmp_path, padding_free):
    cfg = load_config(GRPOConfig, find_recipe("grpo").path, [
        f"model.path={request.getfixturevalue(model_dir)}", f"run.out_dir={tmp_path}", *FAST,
        f"update.padding_free={padding_free}", "train.batch_size=8", "train.micro_batch_size=8",
        "sampling.samples_per_prompt=4", "sampling.max_new_tokens=6", "reward.functions={test_dropout_text_hash: 1.0}"])
    first = read_metrics(grpo_main(cfg).run_dir / "metrics.jsonl")[0]
    assert first["logprob_mismatch"] < 1e-5
