"""The local rollout engine on the tiny model: HF-exact greedy tokens, logprobs the trainer reproduces,
stop handling, masks, finish reasons, early exit and seeded sampling, for both decoders."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from posttrain.errors import ConfigError
from posttrain.rollout import (
    LocalRolloutEngine,
    SamplingParams,
    concat_rollouts,
    logprob_mismatch,
    make_engine,
    policy_logprobs,
)
from posttrain.rollout.forward import HFDecoder, LlamaDecoder, left_pad, make_decoder

FORWARDS = ["llama", "hf"]
QUESTIONS = ["What is 1+1?", "Count from 3 to 9.", "Hi", "What is 12*7?\nWhat is 40-13? 27\nWhat is 5+5?"]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Chat prompts of clearly different lengths (5 to 40-odd tokens): the left padding matters."""
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              return_dict=False) for q in QUESTIONS]
    assert len({len(p) for p in rendered}) == len(rendered)
    return rendered


def _hf_greedy(model, tokenizer, prompts, max_new_tokens):
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[:, input_ids.shape[1]:]


def _eos_bias(model, bias: float):
    """Add `bias` to the EOS logit of every forward (a hook on lm_head, which both decoders call)."""
    eos = model.config.eos_token_id

    def hook(module, inputs, output):
        output[..., eos] += bias
        return output

    return model.lm_head.register_forward_hook(hook)


def _boundary_stop_string(tokenizer, rollout) -> tuple[int, int, str]:
    """(row, index, stop): a stop string of the end of token index-1's text and the start of token index's,
    whose first occurrence in the row's completion is there (so the completion must stop at `index`)."""
    for row, (ids, n) in enumerate(zip(rollout.completion_ids, rollout.completion_lengths, strict=True)):
        ids = ids[:n].tolist()
        for at in range(2, len(ids)):
            prefix, piece = tokenizer.decode(ids[:at]), tokenizer.decode(ids[at : at + 1])
            if len(prefix) < 2 or not piece or tokenizer.decode(ids[: at + 1]) != prefix + piece:
                continue
            stop = prefix[-2:] + piece[0]
            if (prefix + piece).find(stop) == len(prefix) - 2:
                return row, at, stop
    raise AssertionError("no completion has a usable token boundary for a stop string")


@pytest.mark.parametrize("forward", FORWARDS)
def test_greedy_matches_transformers_generate_on_a_ragged_left_padded_batch(tiny_model, tokenizer, prompts, forward):
    rollout = LocalRolloutEngine(tiny_model, tokenizer, forward).generate(
        prompts, SamplingParams(max_new_tokens=12, temperature=0))
    assert torch.equal(rollout.completion_ids, _hf_greedy(tiny_model, tokenizer, prompts, 12))
    for ids, mask, reason in zip(rollout.completion_ids, rollout.response_mask, rollout.finish_reasons, strict=True):
        ids = ids[mask.bool()].tolist()
        assert reason == ("eos" if ids[-1] == tokenizer.eos_token_id else "length")
        assert tokenizer.eos_token_id not in ids[:-1] and (reason == "eos" or len(ids) == 12)
    assert rollout.prompt_ids.shape == (len(prompts), max(map(len, prompts)))
    for row, prompt in zip(rollout.prompt_ids, prompts, strict=True):  # left-padded, prompts end together
        assert row[-len(prompt):].tolist() == prompt


@pytest.mark.parametrize("architecture", ["qwen2", "mistral", "qwen3"])
def test_auto_picks_the_llama_decoder_for_llama_like_models_and_hf_where_a_window_cuts(tiny_model, tokenizer, prompts,
                                                                                       architecture):
    """Qwen2 (q/k/v biases), Mistral and Qwen3 (a norm of each head's query and key) are Llama layer for layer
    otherwise: the Llama decoder samples them exactly, as long as no sliding window is shorter than the sequence;
    where one is, `auto` falls back to the model's forward."""
    assert isinstance(make_decoder("auto", tiny_model, prompts[:2], 1, 4, 0), LlamaDecoder)
    cls_config, cls_model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[architecture]
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=tokenizer.eos_token_id)
    window = dict(use_sliding_window=True, max_window_layers=0) if architecture != "mistral" else {}
    longest = max(map(len, prompts)) + 8
    for sliding_window, expected in ((longest, LlamaDecoder), (longest - 1, HFDecoder)):
        torch.manual_seed(0)
        model = cls_model(cls_config(**shape, **window, sliding_window=sliding_window)).eval()
        for norm in (m for name, m in model.named_modules() if name.endswith(("q_norm", "k_norm"))):
            torch.nn.init.normal_(norm.weight, 1.0, 0.5)  # not the identity an initial RMSNorm weight of 1 is
        assert isinstance(make_decoder("auto", model, prompts, 1, 8, 0), expected)
        rollout = LocalRolloutEngine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=8,
                                                                                        temperature=0))
        assert torch.equal(rollout.completion_ids, _hf_greedy(model, tokenizer, prompts, 8))
        if expected is HFDecoder:
            with pytest.raises(ValueError, match="needs a model of Llama's architecture"):
                make_decoder("llama", model, prompts, 1, 8, 0)
        else:
            sampled = LocalRolloutEngine(model, tokenizer).generate(
                prompts, SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=0))
            assert logprob_mismatch(sampled.logprobs, policy_logprobs(model, sampled), sampled.response_mask) < 1e-5


@pytest.mark.parametrize("kernel", ["0", "1"], ids=["torch-products", "cpp-kernel"])
@pytest.mark.parametrize("per_group", [16, 1], ids=["one-group", "a-group-each"])
def test_llama_decoder_handles_grouped_query_attention(tokenizer, prompts, monkeypatch, per_group, kernel):
    """Both decode attentions (`rollout.decode_attention`), each forced through POSTTRAIN_DECODE_KERNEL."""
    monkeypatch.setenv("POSTTRAIN_DECODE_KERNEL", kernel)
    monkeypatch.setattr(LlamaDecoder, "PROMPTS_PER_GROUP", per_group)  # 1: each prompt its own length group
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rollout = LocalRolloutEngine(model, tokenizer, "llama").generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert torch.equal(rollout.completion_ids, _hf_greedy(model, tokenizer, prompts, 8))
    # n samples per prompt share the prompt's KV cache: each still samples from its own distribution.
    sampled = LocalRolloutEngine(model, tokenizer, "llama").generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=0))
    recomputed = policy_logprobs(model, sampled)
    assert logprob_mismatch(sampled.logprobs, recomputed, sampled.response_mask) < 1e-5


@pytest.mark.parametrize("forward", FORWARDS)
def test_prompt_seeds_sample_each_prompt_the_same_whichever_prompts_share_the_call(tiny_model, tokenizer, prompts,
                                                                                  forward):
    engine = LocalRolloutEngine(tiny_model, tokenizer, forward)

    def sampled(indices, seeds):
        rollout = engine.generate([prompts[i] for i in indices], SamplingParams(
            max_new_tokens=10, temperature=1.0, n=3, prompt_seeds=seeds))
        rows = rollout.completion_ids.view(len(indices), 3, -1)
        return {i: [row[mask.bool()].tolist() for row, mask in zip(rows[k], rollout.response_mask.view(
            len(indices), 3, -1)[k], strict=True)] for k, i in enumerate(indices)}

    together = sampled([0, 1, 2, 3], (7, 8, 9, 10))
    assert sampled([2], (9,))[2] == together[2]
    assert sampled([3, 0], (10, 7)) == {i: together[i] for i in (3, 0)}
    assert len({tuple(map(tuple, samples)) for samples in together.values()}) == 4  # not one stream for all
    assert together[1] != sampled([1], (11,))[1]  # the seed, not the prompt alone, draws them
    with pytest.raises(ValueError, match="prompt_seeds has 1 seeds for 2 prompts"):
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, prompt_seeds=(1,)))


@pytest.mark.parametrize("forward", FORWARDS)
def test_under_bf16_autocast_the_engine_samples_in_bf16_close_to_the_bf16_trainer(tiny_model, tokenizer, prompts,
                                                                                   forward):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=0)
    engine = LocalRolloutEngine(tiny_model, tokenizer, forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = engine.generate(prompts, params)
        trainer_bf16 = policy_logprobs(tiny_model, rollout)
    fp32 = policy_logprobs(tiny_model, rollout)
    bf16_gap = logprob_mismatch(rollout.logprobs, trainer_bf16, rollout.response_mask)
    # bf16 rounding (8 bits) of both sides, nothing structural; and the sampler did run in bf16.
    assert bf16_gap < 0.05 and logprob_mismatch(rollout.logprobs, fp32, rollout.response_mask) > 1e-4


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=0),
    SamplingParams(max_new_tokens=10, temperature=0.7, n=3, seed=1),
    SamplingParams(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9, n=3, seed=2),
], ids=["t1", "t0.7", "t1.3-topk-topp"])
def test_trainer_recomputes_the_sampler_logprobs(tiny_model, tokenizer, prompts, forward, params):
    # Every odd token id stops: about half the rows stop at each step, so completions are ragged and
    # the recompute has to get the padding between them right.
    params = dataclasses.replace(params, stop_token_ids=tuple(range(3, len(tokenizer), 2)))
    rollout = LocalRolloutEngine(tiny_model, tokenizer, forward).generate(prompts, params)
    assert rollout.temperature == params.temperature
    recomputed = policy_logprobs(tiny_model, rollout)
    lengths = rollout.completion_lengths
    assert lengths.min() < lengths.max()
    assert logprob_mismatch(rollout.logprobs, recomputed, rollout.response_mask) < 1e-5
    torch.testing.assert_close(recomputed, rollout.logprobs, rtol=1e-4, atol=1e-5)
    assert (rollout.logprobs[rollout.response_mask == 0] == 0).all()
    # The check has teeth: recomputing at the wrong temperature is far off.
    wrong = policy_logprobs(tiny_model, rollout, temperature=params.temperature + 0.5)
    assert logprob_mismatch(rollout.logprobs, wrong, rollout.response_mask) > 1e-2


def test_rollout_tensors_can_be_trained_on(tiny_model, tokenizer, prompts):
    rollout = make_engine("local", tiny_model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=6, seed=0))
    assert not rollout.completion_ids.is_inference() and not rollout.logprobs.is_inference()
    logprobs = policy_logprobs(tiny_model, rollout)
    logprobs.sum().backward()
    assert tiny_model.lm_head.weight.grad is not None


def test_seeded_sampling_is_reproducible_and_both_decoders_agree(tiny_model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, n=3, seed=7)
    llama = LocalRolloutEngine(tiny_model, tokenizer, "llama")
    first, again = llama.generate(prompts, params), llama.generate(prompts, params)
    assert torch.equal(first.completion_ids, again.completion_ids) and torch.equal(first.logprobs, again.logprobs)
    with_generator = llama.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, n=3),
                                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.completion_ids, with_generator.completion_ids)
    other_seed = llama.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, n=3, seed=8))
    assert not torch.equal(first.completion_ids, other_seed.completion_ids)
    hf = LocalRolloutEngine(tiny_model, tokenizer, "hf").generate(prompts, params)
    assert torch.equal(first.completion_ids, hf.completion_ids)
    torch.testing.assert_close(first.logprobs, hf.logprobs, rtol=1e-4, atol=1e-5)


def test_n_samples_per_prompt_are_prompt_major(tiny_model, tokenizer, prompts):
    rollout = LocalRolloutEngine(tiny_model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=5, n=3, seed=0))
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(rollout.texts) == len(rollout.finish_reasons) == 12
    greedy = LocalRolloutEngine(tiny_model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=5, n=2,
                                                                                        temperature=0))
    assert torch.equal(greedy.completion_ids[0::2], greedy.completion_ids[1::2])  # one shared prefill, same argmax


@pytest.mark.parametrize("forward", FORWARDS)
def test_stop_token_ids_end_the_completion_inside_the_mask(tiny_model, tokenizer, prompts, forward):
    engine = LocalRolloutEngine(tiny_model, tokenizer, forward)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    row = int(torch.nonzero(free.completion_lengths >= 4)[0])
    stop_id = int(free.completion_ids[row, 3])
    first = [ids[:n].tolist().index(stop_id) if stop_id in ids[:n].tolist() else None
             for ids, n in zip(free.completion_ids, free.completion_lengths, strict=True)]
    assert first[row] is not None and first[row] <= 3
    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop_id,)))
    for b, at in enumerate(first):
        if at is None:
            assert stopped.finish_reasons[b] == free.finish_reasons[b]
            assert torch.equal(stopped.response_mask[b], free.response_mask[b])
            continue
        assert stopped.finish_reasons[b] == "stop"
        assert stopped.response_mask[b].sum() == at + 1  # the stop token itself is in the mask
        assert stopped.completion_ids[b, at] == stop_id
        assert (stopped.completion_ids[b, at + 1:] == tokenizer.pad_token_id).all()
        assert stopped.completion_ids[b, :at + 1].tolist() == free.completion_ids[b, :at + 1].tolist()


@pytest.mark.parametrize("forward", FORWARDS)
def test_stop_strings_end_the_completion_and_its_text(tiny_model, tokenizer, prompts, forward):
    engine = LocalRolloutEngine(tiny_model, tokenizer, forward)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    row, at, stop = _boundary_stop_string(tokenizer, free)
    tokens = free.completion_ids[row].tolist()
    prefix = tokenizer.decode(tokens[:at])
    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)))
    assert stopped.finish_reasons[row] == "stop"
    assert stopped.response_mask[row].sum() == at + 1  # through the token that completes the stop string
    assert stopped.completion_ids[row, : at + 1].tolist() == tokens[: at + 1]
    assert stopped.texts[row] == prefix + tokenizer.decode(tokens[at : at + 1])[:1]  # cut right after it
    assert stopped.texts[row].endswith(stop) and stopped.texts[row].count(stop) == 1


@pytest.mark.parametrize("forward", FORWARDS)
def test_eos_is_kept_in_the_mask_and_generation_exits_early(tiny_model, tokenizer, prompts, forward):
    eos = tokenizer.eos_token_id
    engine = LocalRolloutEngine(tiny_model, tokenizer, forward)
    with _eos_bias(tiny_model, 100.0):  # EOS certain at once: every row done after one step
        rollout = engine.generate(prompts, SamplingParams(max_new_tokens=20, seed=0))
    assert rollout.completion_ids.shape == (len(prompts), 1)
    assert rollout.completion_ids[:, 0].tolist() == [eos] * len(prompts)
    assert rollout.response_mask.tolist() == [[1]] * len(prompts)
    assert rollout.finish_reasons == ["eos"] * len(prompts) and rollout.texts == [""] * len(prompts)
    with _eos_bias(tiny_model, 7.0):  # EOS likely (p ~ 0.5 a step on a random model), not certain
        ragged = engine.generate(prompts, SamplingParams(max_new_tokens=40, n=4, seed=0))
    lengths = ragged.completion_lengths
    assert ragged.completion_ids.shape[1] == lengths.max() < 40  # exits when the last row is done
    assert lengths.min() < lengths.max()
    for b, reason in enumerate(ragged.finish_reasons):
        ids = ragged.completion_ids[b, : lengths[b]].tolist()
        assert reason == "eos" and ids[-1] == eos and eos not in ids[:-1]
        assert (ragged.completion_ids[b, lengths[b]:] == tokenizer.pad_token_id).all()


def test_generation_config_eos_ids_count_as_eos(tiny_model, tokenizer, prompts):
    engine = LocalRolloutEngine(tiny_model, tokenizer)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    row = int(torch.nonzero(free.completion_lengths >= 3)[0])
    extra_eos = int(free.completion_ids[row, 2])
    tiny_model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos]
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert rollout.finish_reasons[row] == "eos" and rollout.response_mask[row].sum() <= 3
    assert rollout.completion_ids[row, rollout.completion_lengths[row] - 1] == extra_eos


def test_token_batch_input_training_mode_and_weight_updates(tiny_model, tokenizer, prompts):
    engine = make_engine("local", tiny_model, tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="right", return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # really padded, on the right
    tiny_model.train()
    from_lists = engine.generate(prompts, params)
    assert torch.equal(engine.generate(batch, params).completion_ids, from_lists.completion_ids)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())  # mode given back
    with torch.no_grad():  # a local engine samples from the live module: an optimizer step shows at once
        tiny_model.lm_head.weight.mul_(-1.0)
    engine.update_weights(tiny_model)
    assert not torch.equal(engine.generate(prompts, params).completion_ids, from_lists.completion_ids)


def test_llama_decoder_applies_lora_adapters(tiny_model, tokenizer, prompts):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter really changes the outputs
    policy = get_peft_model(tiny_model, config).eval()
    params = SamplingParams(max_new_tokens=8, temperature=0)
    rollout = LocalRolloutEngine(policy, tokenizer, "llama").generate(prompts, params)
    assert torch.equal(rollout.completion_ids, _hf_greedy(policy, tokenizer, prompts, 8))
    with policy.disable_adapter():
        assert not torch.equal(LocalRolloutEngine(policy, tokenizer, "llama").generate(prompts, params).completion_ids,
                               rollout.completion_ids)
    sampled = LocalRolloutEngine(policy, tokenizer).generate(prompts, SamplingParams(max_new_tokens=8, seed=0))
    recomputed = policy_logprobs(policy, sampled)
    assert logprob_mismatch(sampled.logprobs, recomputed, sampled.response_mask) < 1e-5


@torch.no_grad()
def _assert_each_row_as_its_forward_alone(model, rollout) -> None:
    """The sampler's logprobs of each row are those of the model's own forward on that row alone (its prompt and
    completion, no padding, no cache)."""
    for row in range(len(rollout.texts)):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        completion = rollout.completion_ids[row][rollout.response_mask[row].bool()]
        logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.float(), dim=-1).gather(1, completion[:, None]).squeeze(1)
        assert_close(rollout.logprobs[row, :len(completion)], expected, rtol=0, atol=2e-5)


def test_a_prefix_tuned_model_samples_what_its_own_forward_computes(tiny_model, tokenizer, prompts):
    """Prefix-tuning: the virtual keys and values (random here, so they matter) in front of every prompt, positions
    offset by their count, as peft's forward computes them. Reference: each row's prompt and completion alone
    through the peft model, no padding, no cache. Prompt tuning (virtual input embeddings) is still refused."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    policy = get_peft_model(tiny_model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        policy.prompt_encoder["default"].embedding.weight.normal_(std=1.0)
    params = SamplingParams(max_new_tokens=6, n=2, seed=0)
    rollout = LocalRolloutEngine(policy, tokenizer).generate(prompts, params)
    _assert_each_row_as_its_forward_alone(policy, rollout)
    with torch.no_grad(), policy.disable_adapter():
        plain = LocalRolloutEngine(policy, tokenizer).generate(prompts, params)
    assert (plain.logprobs - rollout.logprobs).abs().max() > 0.01  # the prefix changes the distribution
    tuned = get_peft_model(copy.deepcopy(tiny_model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="does not support prompt-tuning adapters"):
        LocalRolloutEngine(tuned, tokenizer).generate(prompts, SamplingParams(max_new_tokens=2))


def test_a_prefix_tuned_model_with_a_sliding_window_the_padding_would_cut_is_refused(tokenizer, prompts):
    """The window counts cache columns, and the left padding sat between the prefix and a shorter prompt: its
    virtual tokens left the window early and the sampler drew from another distribution than peft's forward (0.06-
    0.17 off). Refused where that can happen; sampled as peft computes it where the window holds everything."""
    from peft import PrefixTuningConfig, get_peft_model

    longest = max(map(len, prompts))
    for window, refused in ((longest + 4 + 5, True), (longest + 4 + 6, False)):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=window, max_position_embeddings=256)).eval()
        policy = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
        with torch.no_grad():
            policy.prompt_encoder["default"].embedding.weight.normal_(std=1.0)
        engine = LocalRolloutEngine(policy, tokenizer)
        params = SamplingParams(max_new_tokens=6, seed=0)
        if refused:
            with pytest.raises(ConfigError, match="sliding window of .* only when the 4 virtual tokens"):
                engine.generate(prompts, params)
            continue
        _assert_each_row_as_its_forward_alone(policy, engine.generate(prompts, params))


def test_joined_rollouts_hold_row_by_row_what_their_parts_held(tiny_model, tokenizer, prompts):
    engine = LocalRolloutEngine(tiny_model, tokenizer)
    short = engine.generate(prompts[2:3], SamplingParams(max_new_tokens=3, n=2, seed=0))  # narrow in both widths
    long = engine.generate(prompts[:2] + prompts[3:], SamplingParams(max_new_tokens=9, n=2, seed=1))
    joined = concat_rollouts([short, long])
    assert joined.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # the second part's prompts follow
    assert joined.texts == short.texts + long.texts
    assert joined.finish_reasons == short.finish_reasons + long.finish_reasons
    for part, rows in ((short, [0, 1]), (long, list(range(2, 8)))):
        mine = joined.select(rows)  # trimmed back to the part's own widths
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "response_mask", "logprobs"):
            assert torch.equal(getattr(mine, name), getattr(part.select(range(len(rows))), name)), name
    # The joined layout is one the trainer recomputes: every row's logprobs are the sampler's.
    torch.testing.assert_close(policy_logprobs(tiny_model, joined), joined.logprobs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="temperatures"):
        concat_rollouts([short, dataclasses.replace(long, temperature=0.5)])


@pytest.mark.parametrize("kernel", ["0", "1"], ids=["torch-products", "cpp-kernel"])
@pytest.mark.parametrize("per_group", [16, 3], ids=["one-group", "groups"])
def test_finished_rows_leave_the_batch_and_the_others_sample_as_before(tiny_model, tokenizer, prompts, monkeypatch,
                                                                       per_group, kernel):
    """Both decoders stop computing rows that have ended (the Llama decoder a prompt once its n rows have, the HF
    decoder any row); seeded, they must draw the same tokens with the same logprobs as a decoder that computes
    every row to the end, while their batches shrink (the computed rows recorded at every step). With 3 prompts a
    group the Llama decoder attends in several length groups, regrouped as prompts leave; both of its decode
    attentions (`rollout.decode_attention`)."""
    monkeypatch.setenv("POSTTRAIN_DECODE_KERNEL", kernel)
    monkeypatch.setattr(LlamaDecoder, "PROMPTS_PER_GROUP", per_group)
    computed: dict[str, list[int]] = {"llama": [], "hf": []}
    groupings: list[list[tuple[int, int, int]]] = []
    for name, cls, rows in (("llama", LlamaDecoder, "order"), ("hf", HFDecoder, "rows")):
        def recording_step(self, tokens, step=cls.step, name=name, rows=rows):
            computed[name].append(len(getattr(self, rows)))
            if name == "llama":
                groupings.append(self.groups)
            return step(self, tokens)

        monkeypatch.setattr(cls, "step", recording_step)
    many = [p for p in prompts for _ in range(5)]  # 20 prompts: their rows end at different steps
    params = SamplingParams(max_new_tokens=30, n=2, seed=3)
    with _eos_bias(tiny_model, 5.0):  # EOS likely, not certain: ragged completion lengths
        llama = LocalRolloutEngine(tiny_model, tokenizer, "llama").generate(many, params)
        hf = LocalRolloutEngine(tiny_model, tokenizer, "hf").generate(many, params)
        monkeypatch.setattr(HFDecoder, "COMPACT_AT", 0.0)  # never compacts
        every_row = LocalRolloutEngine(tiny_model, tokenizer, "hf").generate(many, params)
        recomputed = policy_logprobs(tiny_model, llama)  # the trainer's forward, under the same bias
    lengths = llama.completion_lengths
    assert lengths.min() < lengths.max() - 3  # really ragged
    steps = int(lengths.max()) - 1  # decode steps after the prefill's token
    for t in range(steps):  # step t computes token t + 1: every row still going must be in the batch
        going = lengths > t + 1
        assert computed["hf"][t] >= int(going.sum())
        assert computed["llama"][t] >= 2 * int(going.view(-1, 2).any(dim=1).sum())  # whole prompts
    for name in ("llama", "hf"):
        assert computed[name][steps - 1] < 30 and computed[name][:steps] == sorted(computed[name][:steps])[::-1]
    assert computed["hf"][steps:] == [40] * steps  # the run that never compacts
    if per_group == 3:
        assert len(groupings[0]) == 4 and len({tuple(g) for g in groupings}) > 2  # regrouped more than once
    for rollout in (llama, hf):
        assert torch.equal(rollout.completion_ids, every_row.completion_ids)
        assert rollout.finish_reasons == every_row.finish_reasons
        torch.testing.assert_close(rollout.logprobs, every_row.logprobs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recomputed, llama.logprobs, rtol=1e-4, atol=1e-5)


class _NoLogitsToKeep(GPT2LMHeadModel):
    """A forward that drops `logits_to_keep` in its **kwargs (as older trust_remote_code models do): every
    position's logits come back."""

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, use_cache=None,
                **ignored):
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=use_cache)


class _StrictForward(GPT2LMHeadModel):
    """A forward that takes no `logits_to_keep` at all (a TypeError if given one)."""

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, use_cache=None):
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=use_cache)


def _gpt2(cls, tokenizer, positions: int = 128):
    torch.manual_seed(0)
    return cls(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)).eval()


@pytest.mark.parametrize("cls", [_NoLogitsToKeep, _StrictForward])
def test_a_forward_without_logits_to_keep_samples_and_recomputes_the_same_logprobs(tokenizer, prompts, cls):
    """The recompute read the first T + 1 positions' logits of a model that ignored logits_to_keep (a shape error,
    or the wrong positions), and a strict forward raised a TypeError in the sampler and the trainer."""
    from posttrain.models.likelihood import response_logprobs

    model, reference = _gpt2(cls, tokenizer), _gpt2(GPT2LMHeadModel, tokenizer)
    params = SamplingParams(max_new_tokens=6, n=2, seed=0, stop_token_ids=tuple(range(3, len(tokenizer), 2)))
    rollout = LocalRolloutEngine(model, tokenizer).generate(prompts, params)
    expected = LocalRolloutEngine(reference, tokenizer).generate(prompts, params)
    assert rollout.completion_ids.tolist() == expected.completion_ids.tolist()
    assert_close(policy_logprobs(model, rollout), policy_logprobs(reference, expected), rtol=1e-5, atol=1e-6)
    assert_close(policy_logprobs(model, rollout), rollout.logprobs, rtol=1e-4, atol=1e-5)
    batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
             "position_ids": rollout.position_ids,
             "response_mask": torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], 1)}
    for got, want in zip(response_logprobs(model, batch), response_logprobs(reference, batch), strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    from posttrain.models.heads import forward_keeping

    none = forward_keeping(model, torch.zeros(0, dtype=torch.long), input_ids=rollout.input_ids).logits
    assert none.shape == (len(rollout.input_ids), 0, len(tokenizer))  # no position kept: none computed or cut


def test_a_learned_position_table_too_short_for_prompt_and_new_tokens_is_a_config_error(tokenizer, prompts):
    """GPT-2's position table has no row past its end: an IndexError in the middle of generation before."""
    model = _gpt2(GPT2LMHeadModel, tokenizer, positions=max(map(len, prompts)) + 4)
    engine = LocalRolloutEngine(model, tokenizer)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=4, seed=0)).completion_ids.shape[0] == len(prompts)
    with pytest.raises(ConfigError, match=r"a prompt of \d+ tokens and max_new_tokens=5 new ones are longer than"):
        engine.generate(prompts, SamplingParams(max_new_tokens=5, seed=0))
    from peft import PrefixTuningConfig, get_peft_model  # prefix-tuning's virtual tokens take positions too

    prefixed = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="new ones \\(after 2 virtual tokens\\) are longer than"):
        LocalRolloutEngine(prefixed, tokenizer).generate(prompts, SamplingParams(max_new_tokens=4, seed=0))
