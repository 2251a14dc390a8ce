"""Models other than Llama: dropout is off where models are loaded (modules, attributes read in forward, and
the config) unless `model.disable_dropout=false`, for policies, reward models and critics; LoRA's default
targets every linear layer of GPT-2 (Conv1D), Phi and Llama, peft's per-architecture default is one setting
away, and a target that matches no layer is a ConfigError naming the layers there are. Reward models and critics
of architectures transformers has no classifier for; padding-free batches refused for a model without
position_ids."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
    PhiConfig,
)

from posttrain.config import ModelConfig, load_config
from posttrain.data.collate import collate_packed, collate_padded
from posttrain.errors import ConfigError
from posttrain.models import load_tokenizer_and_model, save_pretrained
from posttrain.models.adapters import AdapterConfig, apply_adapter
from posttrain.models.dropout import disable_dropout
from posttrain.models.likelihood import response_logprobs
from posttrain.models.reward import build_reward_model, load_reward_model, sequence_scores
from posttrain.models.value import build_value_model
from posttrain.recipes.sft import SFTConfig

VOCAB = 97


def tiny_config(kind: str, vocab: int = VOCAB, dropout: float = 0.1):
    """GPT-2 (nn.Dropout modules, Conv1D layers), Phi (modules and the attention's float attribute) and Llama
    (the attention's float attribute alone): every dropout at `dropout`."""
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=dropout,
                          embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, attention_dropout=dropout, pad_token_id=0)
    if kind == "phi":
        return PhiConfig(resid_pdrop=dropout, embd_pdrop=dropout, **common)
    return LlamaConfig(**common)


def tiny_lm(kind: str, vocab: int = VOCAB, dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(kind, vocab, dropout))


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def train_mode_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.train()(input_ids=IDS).logits


def eval_mode_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("kind", ["gpt2", "phi", "llama"])
def test_disable_dropout_makes_a_train_mode_forward_the_eval_mode_one(kind):
    model = tiny_lm(kind)
    assert not torch.equal(train_mode_logits(model), train_mode_logits(model))  # dropout is on
    disable_dropout(model)
    assert torch.equal(train_mode_logits(model), eval_mode_logits(model))
    # The config too (some models read it in forward), so a saved model records what it trained with.
    rates = {k: v for k, v in vars(model.config).items() if "drop" in k and isinstance(v, float)}
    assert rates and set(rates.values()) == {0.0}


@pytest.mark.parametrize("kind", ["mixtral", "phimoe"])
def test_disable_dropout_keeps_a_router_that_draws_jitter_in_training_deterministic(kind):
    """Mixtral's router jitter and PhiMoE's sampled experts (its default) kept a train-mode forward random after
    disable_dropout: a first update's ratio was not 1. PhiMoE's eval routing (which reads router_jitter_noise as a
    threshold) must stay what it was."""
    from transformers import MixtralConfig, PhimoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)
    config = (MixtralConfig(router_jitter_noise=0.3, **common) if kind == "mixtral"
              else PhimoeConfig(input_jitter_noise=0.1, **common))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before = eval_mode_logits(model)
    assert not torch.equal(train_mode_logits(model), train_mode_logits(model))  # random in training mode
    disable_dropout(model)
    assert torch.equal(train_mode_logits(model), eval_mode_logits(model))
    assert torch.equal(eval_mode_logits(model), before) and model.training is False
    model.train()
    assert model.training and model.lm_head.training  # everything else trains as before
    logits = model(input_ids=IDS).logits
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lm_head" in n or "gate" in n)


@pytest.fixture()
def gpt2_dir(tokenizer, tmp_path):
    """A tiny GPT-2 with dropout 0.1, saved with the project's tokenizer."""
    model = tiny_lm("gpt2", vocab=len(tokenizer))
    model.config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id})
    return str(save_pretrained(model, tokenizer, tmp_path / "gpt2"))


def test_the_model_section_turns_dropout_off_unless_told_to_keep_it(gpt2_dir):
    _, model = load_tokenizer_and_model(ModelConfig(path=gpt2_dir))
    assert torch.equal(train_mode_logits(model), eval_mode_logits(model))
    _, kept = load_tokenizer_and_model(ModelConfig(path=gpt2_dir, disable_dropout=False))
    assert not torch.equal(train_mode_logits(kept), train_mode_logits(kept))
    assert kept.config.resid_pdrop == 0.1
    _, sft = load_tokenizer_and_model(ModelConfig(path=gpt2_dir), compares_logprobs=False)  # SFT: it regularises
    assert not torch.equal(train_mode_logits(sft), train_mode_logits(sft))
    _, off = load_tokenizer_and_model(ModelConfig(path=gpt2_dir, disable_dropout=True), compares_logprobs=False)
    assert torch.equal(train_mode_logits(off), eval_mode_logits(off))


def test_reward_models_and_critics_are_built_without_dropout_unless_told_to_keep_it(gpt2_dir, tokenizer):
    batch = collate_padded([{"input_ids": ids.tolist(), "response_mask": [1] * len(ids)} for ids in IDS],
                           tokenizer.pad_token_id)

    def scores(model, train: bool) -> torch.Tensor:
        with torch.no_grad():
            return sequence_scores(model.train(train), batch)

    reward_model = build_reward_model(gpt2_dir, pad_token_id=tokenizer.pad_token_id, disable_dropout=True)
    critic = build_value_model(gpt2_dir, "policy", disable_dropout=True)
    torch.nn.init.normal_(critic.score.weight)  # a zero head scores 0 with or without dropout
    for model in (reward_model, critic):
        assert torch.equal(scores(model, train=True), scores(model, train=False))
    kept = build_reward_model(gpt2_dir, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(scores(kept, train=True), scores(kept, train=True))


def test_lora_adds_no_dropout_to_a_model_whose_dropout_is_off_and_keeps_it_otherwise(gpt2_dir):
    adapter = AdapterConfig(method="lora", r=2, dropout=0.5)

    def trained_lora(model):
        policy = apply_adapter(model, adapter)
        with torch.no_grad():  # B != 0: the adapter's path (and its dropout) counts in the output
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(parameter)
        return policy

    def lora_dropout_rates(policy) -> set[float]:
        return {getattr(module.lora_dropout["default"], "p", 0.0) for module in policy.modules()
                if isinstance(module, LoraLayer)}

    _, model = load_tokenizer_and_model(ModelConfig(path=gpt2_dir))  # a stage that compares logprobs
    policy = trained_lora(model)
    assert lora_dropout_rates(policy) == {0.0}
    assert torch.equal(train_mode_logits(policy), eval_mode_logits(policy))
    _, sft = load_tokenizer_and_model(ModelConfig(path=gpt2_dir), compares_logprobs=False)  # SFT: it regularises
    assert lora_dropout_rates(trained_lora(sft)) == {0.5}


def adapted(model, targets: list[str]) -> set[str]:
    """The dotted names (under the peft wrapper) of the layers LoRA adapts with `targets`."""
    peft_model = apply_adapter(model, AdapterConfig(method="lora", r=2, target_modules=targets))
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def per_layer(pattern: str, names: list[str]) -> set[str]:
    return {pattern.format(i=i, name=name) for i in range(2) for name in names}


@pytest.mark.parametrize(("kind", "expected"), [
    ("gpt2", per_layer("transformer.h.{i}.{name}", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])),
    ("phi", per_layer("model.layers.{i}.{name}", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.dense", "mlp.fc1", "mlp.fc2"])),
    ("llama", per_layer("model.layers.{i}.{name}", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj"])),
])
def test_lora_adapts_every_linear_layer_but_the_output_head_by_default(kind, expected):
    assert AdapterConfig().target_modules == ["all-linear"]
    assert adapted(tiny_lm(kind), ["all-linear"]) == expected
    assert adapted(tiny_lm(kind), AdapterConfig().target_modules) == expected


@pytest.mark.parametrize(("kind", "expected"), [
    ("gpt2", per_layer("transformer.h.{i}.{name}", ["attn.c_attn"])),
    ("phi", per_layer("model.layers.{i}.{name}", ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2"])),
    ("llama", per_layer("model.layers.{i}.{name}", ["self_attn.q_proj", "self_attn.v_proj"])),
])
def test_an_empty_target_list_takes_peft_s_default_for_the_architecture(kind, expected):
    assert adapted(tiny_lm(kind), []) == expected


def test_named_targets_adapt_those_layers():
    assert adapted(tiny_lm("gpt2"), ["c_fc"]) == {f"transformer.h.{i}.mlp.c_fc" for i in range(2)}


LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(("kind", "targets", "message"), [
    # GPT-2 has none of Llama's names (peft alone fails with a traceback).
    ("gpt2", LLAMA_NAMES, "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj match no layer of this "
                          "gpt2 model; its linear layers: c_attn, c_proj, c_fc"),
    # Phi has three of them: peft alone would silently adapt q/k/v only.
    ("phi", LLAMA_NAMES, "o_proj, gate_proj, up_proj, down_proj match no layer of this phi model; its linear "
                         "layers: q_proj, k_proj, v_proj, dense, fc1, fc2"),
    ("llama", ["q_proj", "qproj"], "qproj matches no layer of this llama model"),
    ("llama", ["mlp"], "mlp matches no layer"),  # a block, not a layer LoRA can adapt
    ("llama", ["all-linear", "q_proj"], "all-linear stands alone"),
])
def test_targets_that_match_no_layer_are_a_config_error_naming_the_layers_there_are(kind, targets, message):
    with pytest.raises(ConfigError, match=message) as caught:
        adapted(tiny_lm(kind), targets)
    assert caught.value.field == "adapter.target_modules"


def test_all_linear_is_accepted_as_an_override():
    cfg = load_config(SFTConfig, None, ["adapter.method=lora", "adapter.target_modules=all-linear"])
    assert cfg.adapter.target_modules == ["all-linear"]


def tiny_classifierless_lm(kind: str, tokenizer) -> torch.nn.Module:
    """A tiny causal LM of an architecture transformers has no sequence-classification class for: Granite (its
    multipliers away from 1, so a trunk built some other way would score differently), Cohere (a LayerNorm with no
    bias) or Falcon-H1 (Mamba mixers beside attention, and a non-persistent buffer that only initialisation sets)."""
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    extra = {"granite": {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3},
             "cohere": {"logit_scale": 0.5},
             "falcon_h1": {"head_dim": 8, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_ssm": 32, "mamba_n_groups": 1,
                           "mamba_d_state": 8, "mamba_d_conv": 4}}[kind]
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra))


@pytest.mark.parametrize("kind", ["granite", "cohere", "falcon_h1"])
def test_reward_models_and_critics_of_architectures_transformers_has_no_classifier_for(kind, tokenizer, tmp_path):
    """transformers has no GraniteForSequenceClassification (nor Cohere's): the reward model is built the way it
    builds Llama's, from the causal LM's own trunk, scores at the last real token, saves and loads back (in a
    process that has not built one: the registration is the loader's too), and starts a critic with a zero head."""
    lm = tiny_classifierless_lm(kind, tokenizer)
    config_class = type(lm.config)
    assert config_class not in AutoModelForSequenceClassification._model_mapping
    lm_dir = save_pretrained(lm, tokenizer, tmp_path / "lm")
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    trunk = dict(model.model.named_parameters())
    assert set(trunk) == {name.removeprefix("model.") for name, _ in lm.named_parameters() if name.startswith("model.")}
    for name, parameter in lm.model.named_parameters():
        assert torch.equal(trunk[name], parameter), name
    assert model.score.weight.shape == (1, 32) and model.score.bias is None
    texts = ["What is 2+3? 5", "Hi there"]
    batch = collate_padded([{"input_ids": tokenizer(t)["input_ids"], "response_mask": [1]} for t in texts],
                           tokenizer.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, batch)
        # By hand: the causal LM's trunk, its last real token's hidden state, the head's weights.
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(dim=1) - 1
        expected = hidden[torch.arange(2), last] @ model.score.weight[0]
    assert_close(scores, expected)
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")
    AutoModelForSequenceClassification._model_mapping._extra_content.pop(config_class)  # as in a new process
    with torch.no_grad():
        assert_close(sequence_scores(load_reward_model(saved), batch), scores)
    critic = build_value_model(lm_dir, "policy")
    assert type(critic).__name__.endswith("ForSequenceClassification") and not critic.score.weight.any()


def test_padding_free_batches_on_a_model_that_takes_no_position_ids_are_a_config_error(tokenizer):
    """Bloom counts its ALiBi positions along the 2-D attention mask and takes no position_ids: a packed row
    would run its second sample on from the first's positions. A one-line error naming the fix, not transformers'
    `ValueError: too many values to unpack`; padded batches run."""
    bloom = tiny_bloom(tokenizer)
    ids = [tokenizer(t)["input_ids"] for t in ["What is 2+3? 5", "Hi there, you"]]
    samples = [{"input_ids": i, "response_mask": [0, 0] + [1] * (len(i) - 2)} for i in ids]
    with pytest.raises(ConfigError, match="this bloom model takes none .*data.batch_mode=padded, "
                                          "update.padding_free=false"):
        response_logprobs(bloom, collate_packed([samples], tokenizer.pad_token_id))
    with pytest.raises(ConfigError, match="this bloom model takes none"):
        sequence_scores(build_bloom_reward_model(bloom), collate_packed([samples], tokenizer.pad_token_id))
    logprobs, mask = response_logprobs(bloom, collate_padded(samples, tokenizer.pad_token_id))
    assert logprobs.shape == mask.shape and mask.sum() == sum(len(i) - 2 for i in ids)


def test_falcon_with_alibi_is_refused_padding_free_batches_and_runs_padded(tokenizer):
    """Falcon takes position_ids, but with `alibi=true` builds its ALiBi bias from a 2-D mask: a packed batch was
    transformers' `ValueError: too many values to unpack` mid-run instead of the one-line error, in every stage."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, alibi=True, new_decoder_architecture=False,
                                            multi_query=True, parallel_attn=True, bias=True)).eval()
    ids = [tokenizer(t)["input_ids"] for t in ["What is 2+3? 5", "Hi there, you"]]
    samples = [{"input_ids": i, "response_mask": [0, 0] + [1] * (len(i) - 2)} for i in ids]
    with pytest.raises(ConfigError, match="this falcon model takes none .*data.batch_mode=padded"):
        response_logprobs(falcon, collate_packed([samples], tokenizer.pad_token_id))
    logprobs, mask = response_logprobs(falcon, collate_padded(samples, tokenizer.pad_token_id))
    for row, sample in enumerate(ids):  # padded rows score each sample as it scores alone
        alone, _ = response_logprobs(falcon, collate_padded([samples[row]], tokenizer.pad_token_id))
        assert_close(logprobs[row, :int(mask[row].sum())], alone[0, :len(sample) - 2], atol=1e-5, rtol=1e-5)


def test_a_reward_model_that_cannot_pack_scores_on_padded_rows(tokenizer):
    """The scorer always packed: a Bloom reward model failed every score of PPO's batches ("use padded batches",
    which the run already did)."""
    from posttrain.rewards.reward_model import RewardModelScorer

    bloom = tiny_bloom(tokenizer)
    bloom.config.num_labels = 1  # one score, as `posttrain rm` builds them
    reward_model = build_bloom_reward_model(bloom).eval()
    scorer = RewardModelScorer(reward_model, tokenizer)
    prompts, completions = ["What is 2+3?", "Hi there, you"], ["5", "hello to you too"]
    scores = scorer.score(prompts, completions)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):  # one sequence at a time
        ids, mask = scorer.encode(prompt, completion)
        alone = sequence_scores(reward_model, collate_padded([{"input_ids": ids, "response_mask": mask}],
                                                             tokenizer.pad_token_id))
        assert_close(scores[i], alone[0].float(), rtol=1e-5, atol=1e-6)


def build_bloom_reward_model(bloom) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_config(bloom.config)
    model.transformer.load_state_dict(bloom.transformer.state_dict())
    return model


def tiny_bloom(tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def test_a_stage_on_a_model_that_cannot_pack_runs_on_padded_batches_and_says_so(tokenizer, tiny_model, tmp_path,
                                                                               caplog):
    """Padding-free is every stage's default; on Bloom a stage switches to padded batches (the settings it has),
    warns once, and records it in the run's config. A model that can pack keeps its settings."""
    from posttrain.recipes import find_recipe
    from posttrain.recipes.grpo import GRPOConfig
    from posttrain.recipes.layout import batches_for
    from posttrain.recipes.sft import main as sft_main

    bloom = tiny_bloom(tokenizer)
    sft = load_config(SFTConfig, find_recipe("sft").path)
    grpo = load_config(GRPOConfig, find_recipe("grpo").path)
    assert sft.data.batch_mode == "padding_free" and grpo.update.padding_free
    assert batches_for(sft, tiny_model) is sft and batches_for(grpo, tiny_model) is grpo
    assert batches_for(sft, bloom).data.batch_mode == "padded"
    switched = batches_for(grpo, bloom)
    assert not switched.update.padding_free and switched.data == grpo.data  # prompts are padded anyway
    bloom_dir = save_pretrained(bloom, tokenizer, tmp_path / "bloom")
    cfg = load_config(SFTConfig, find_recipe("sft").path, [
        f"model.path={bloom_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "data.source=arith", "data.size=8",
        "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4", "train.save_every=0", "eval.problems=0",
        "eval_before=false"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="posttrain"):
        result = sft_main(cfg)
    assert [r.getMessage() for r in caplog.records if "padded batches" in r.getMessage()] == [
        "padding-free and packed batches restart position_ids at every sample; this bloom model takes none (its "
        "positions come from the 2-D attention mask): this run uses padded batches (data.batch_mode=padded)"]
    assert "batch_mode: padded" in (result.run_dir / "config.yaml").read_text()
    assert (result.final_dir / "config.json").is_file()


def test_lora_all_linear_on_a_mamba_hybrid_leaves_out_the_layers_peft_refuses(tokenizer):
    """peft refuses LoRA on the out_proj of Falcon-H1's Mamba mixers (a ValueError out of get_peft_model for
    `all-linear`, every stage's default); all-linear there adapts every other linear layer, the attention's o_proj
    included, and the output head stays out as always."""
    model = tiny_classifierless_lm("falcon_h1", tokenizer)
    expected = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                and not name.endswith("mamba.out_proj") and name != "lm_head"}
    assert any(name.endswith("self_attn.o_proj") for name in expected)
    assert adapted(model, ["all-linear"]) == expected


def test_a_classifier_over_a_trunk_without_position_ids_cannot_pack_either(tokenizer, tmp_path):
    """RWKV has no sequence classifier in transformers: the one built here takes position_ids (transformers' generic
    classifier forward) and hands them to a trunk that takes none. The trunk decides."""
    from posttrain.models.attention import packing_obstacle

    torch.manual_seed(0)
    rwkv = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "rwkv", vocab_size=len(tokenizer), hidden_size=32, attention_hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, context_length=128, pad_token_id=tokenizer.pad_token_id))
    reward_model = build_reward_model(save_pretrained(rwkv, tokenizer, tmp_path / "rwkv"))
    assert "position_ids" in inspect.signature(type(reward_model).forward).parameters
    assert "this rwkv model takes none" in packing_obstacle(reward_model)
    assert "this rwkv model takes none" in packing_obstacle(rwkv)


def test_a_table_of_learned_positions_bounds_the_lengths_a_run_may_ask_for():
    """GPT-2's 512 learned positions (OPT's too, past its offset of 2) are a hard limit, checked before a run
    starts; Llama's and Phi's rotary positions have none."""
    from transformers import OPTConfig

    from posttrain.models.attention import position_limit
    from posttrain.recipes.layout import check_position_limit, check_sampled_length

    gpt2 = tiny_lm("gpt2")
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                     ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                                     max_position_embeddings=128))
    assert (position_limit(gpt2), position_limit(opt)) == (512, 128)
    assert position_limit(tiny_lm("llama")) is None and position_limit(tiny_lm("phi")) is None
    with pytest.raises(ConfigError) as err:
        check_position_limit(load_config(SFTConfig, None, ["model.path=unused", "data.max_length=1024"]), gpt2)
    assert err.value.field == "data.max_length" and "512 positions" in str(err.value)
    check_position_limit(load_config(SFTConfig, None, ["model.path=unused", "data.max_length=512"]), gpt2)
    # Prefix-tuning's virtual tokens take the first positions of every row: a 500-token row and 16 of them do not
    # fit 512 (an IndexError mid-run before).
    prefix = ["model.path=unused", "adapter.method=prefix", "adapter.num_virtual_tokens=16"]
    with pytest.raises(ConfigError, match="the 496 positions this model has after the adapter's 16 virtual tokens"):
        check_position_limit(load_config(SFTConfig, None, [*prefix, "data.max_length=500"]), gpt2)
    check_position_limit(load_config(SFTConfig, None, [*prefix, "data.max_length=496"]), gpt2)
    with pytest.raises(ConfigError) as err:
        check_sampled_length(opt, 100, 29)
    assert err.value.field == "sampling.max_new_tokens"
    check_sampled_length(opt, 100, 28)
    check_sampled_length(tiny_lm("llama"), 100_000, 100_000)  # no error: a warning (below)


def test_a_rotary_model_sampled_past_its_declared_positions_is_warned_of_not_stopped(caplog):
    """A 1515-token prompt on a model made for 512 positions sampled and trained without a word: RoPE has no table
    to run out of, so it is a warning, where a learned table's limit is an error."""
    from posttrain.recipes.layout import check_sampled_length

    llama = tiny_lm("llama")
    declared = llama.config.max_position_embeddings
    check_sampled_length(llama, declared - 8, 8)
    assert not caplog.text
    check_sampled_length(llama, declared - 8, 9)
    assert (f"the longest prompt ({declared - 8} tokens) and sampling.max_new_tokens=9 new ones are longer than the "
            f"{declared} positions this model was made for") in caplog.text


def _rope_model(kind: str) -> torch.nn.Module:
    from transformers import Phi3Config

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  pad_token_id=0)
    if kind == "dynamic":
        config = LlamaConfig(max_position_embeddings=16, **common,
                             rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    elif kind == "longrope":
        config = Phi3Config(max_position_embeddings=64, original_max_position_embeddings=16, **common, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [4.0] * 4,
            "original_max_position_embeddings": 16})
    else:
        config = LlamaConfig(max_position_embeddings=64, **common, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "yarn"])
def test_rotary_scaling_that_follows_the_longest_sequence_bounds_the_sampled_length(kind):
    """Dynamic NTK and longrope change the frequencies of every sequence of a forward with its longest one: past
    that length a sampler's and a trainer's batches score the same tokens differently. Yarn's are fixed."""
    from posttrain.models.attention import rope_switch_length
    from posttrain.recipes.layout import check_sampled_length

    model = _rope_model(kind)
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the first 12 tokens, alone and in a batch whose longest row is 30 tokens
        alone = model(input_ids=ids[:, :12]).logits[0]
        batched = model(input_ids=torch.cat([ids[:, :12], ids[:, 12:24], ids[:, 24:]], dim=1)).logits[0, :12]
    moves = not torch.allclose(alone, batched, atol=1e-4)
    assert moves == (kind != "yarn") and rope_switch_length(model) == (16 if kind != "yarn" else None)
    if kind == "yarn":
        check_sampled_length(model, 40, 20)
        return
    check_sampled_length(model, 8, 8)
    with pytest.raises(ConfigError, match="rotary scaling changes its frequencies") as err:
        check_sampled_length(model, 8, 9)
    assert err.value.field == "sampling.max_new_tokens"
