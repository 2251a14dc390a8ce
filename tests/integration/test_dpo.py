"""DPO recipe: ln 2 at the first step, cached reference == live reference, the LoRA-disabled reference is
the base model, micro-batching invariance, Plackett–Luce DPO at K=2 is pairwise DPO through the recipe."""

from __future__ import annotations

import copy
import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.data.schemas import holds_as_answer
from posttrain.data.tasks import get_task
from posttrain.errors import ConfigError, DataError
from posttrain.models import build_model, save_pretrained
from posttrain.models.adapters import AdapterConfig, apply_adapter
from posttrain.recipes import find_recipe
from posttrain.recipes.dpo import DPOConfig, DPOLossConfig, cached_step_source, dpo_loss_fn, main
from posttrain.rewards.functions import register_reward_function
from posttrain.train.comparisons import comparison_step_source
from posttrain.train.engine import TrainConfig
from posttrain.train.metrics import read_metrics
from posttrain.train.reference import Reference, precompute_sequence_logprobs, sequence_logprobs
from posttrain.train.signals import StoppedInTraining

# Plain DPO (the shipped recipe adds the RPO NLL term): the tests check DPO's own numbers.
FAST = ["run.progress=false", "train.save_every=0", "optim.warmup_steps=0", "eval.problems=4", "eval.samples=2",
        "eval_before=false", "loss.sft_weight=0"]


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def dpo_config(model_dir: str, out, *overrides: str) -> DPOConfig:
    return load_config(DPOConfig, find_recipe("dpo").path, [f"model.path={model_dir}", f"run.out_dir={out}", *FAST,
                                                            *overrides])


def prepared_rows(tokenizer, fmt: str, size: int = 8, batch_mode: str = "padded", dtype=torch.float32):
    return prepare_data(DataConfig(source="arith", size=size, format=fmt, batch_mode=batch_mode), tokenizer,
                        accepts=STAGE_FORMATS["dpo"], mask_dtype=dtype)


def test_the_first_step_loss_is_ln2_when_the_policy_is_the_reference(pretrained_run, tmp_path):
    cfg = dpo_config(pretrained_run.final_dir, tmp_path, "data.size=64", "train.max_steps=3", "train.batch_size=16",
                     "train.micro_batch_size=8", "optim.lr=1e-4", "eval_before=true")
    result = main(cfg)
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    first = metrics[0]
    assert_close(torch.tensor(first["loss"]), torch.tensor(math.log(2)))
    for key in ("chosen_reward", "rejected_reward", "reward_margin"):
        assert_close(torch.tensor(first[key]), torch.tensor(0.0))
    assert first["chosen_logprobs"] > first["rejected_logprobs"]  # the SFT-like start already prefers the answer
    assert metrics[-1]["reward_margin"] > 0 and metrics[-1]["loss"] < math.log(2)
    summary = result.summary
    assert {"accuracy_before", "accuracy", "reward_accuracy", "chosen_reward"} <= set(summary)
    for name in ("report.md", "plots/curves.png", "samples.jsonl", "final/model.safetensors"):
        assert (result.run_dir / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)


def test_the_rpo_loss_logs_its_two_parts_which_add_up_to_it(lm_dir, tmp_path):
    """loss.sft_weight > 0 adds the chosen answers' NLL to the DPO loss: only the sum was logged, so a loss above
    ln 2 at step 1 read as a broken DPO. Both parts are logged now: the DPO part is ln 2 at step 1."""
    cfg = dpo_config(lm_dir, tmp_path, "data.size=16", "train.max_steps=1", "train.batch_size=8",
                     "train.micro_batch_size=4", "loss.sft_weight=0.5", "eval.problems=0")
    [first] = read_metrics(main(cfg).run_dir / "metrics.jsonl")
    assert_close(torch.tensor(first["dpo_loss"]), torch.tensor(math.log(2)))
    assert first["sft_loss"] > 0
    assert_close(torch.tensor(first["loss"]), torch.tensor(first["dpo_loss"] + 0.5 * first["sft_loss"]))


def test_a_reference_of_another_tokenizer_is_refused_naming_reference_path(lm_dir, chatml_model_dir, tmp_path):
    """It scored the policy's token ids as its own: logprobs that meant nothing (silently), or an index error."""
    from posttrain.train.reference import ReferenceConfig, load_reference

    with pytest.raises(ConfigError, match="has another tokenizer than the policy") as err:
        main(dpo_config(lm_dir, tmp_path, f"reference.path={chatml_model_dir}", "train.max_steps=1"))
    assert err.value.field == "reference.path" and not list(tmp_path.rglob("metrics.jsonl"))
    cfg = dpo_config(lm_dir, tmp_path)
    assert load_reference(ReferenceConfig(path=lm_dir), cfg.model) is not None  # the policy's own tokenizer


@pytest.mark.parametrize(("fmt", "kind", "batch_mode"), [
    ("preference", "sigmoid", "padded"), ("ranking", "sigmoid", "padded"), ("preference", "ipo", "padded"),
    ("preference", "ipo", "padding_free"), ("ranking", "sigmoid", "padding_free")])
def test_cached_reference_logprobs_equal_the_live_ones(tiny_model, tokenizer, fmt, kind, batch_mode):
    prepared = prepared_rows(tokenizer, fmt, batch_mode=batch_mode)
    reference = Reference.frozen_copy(tiny_model)
    average = kind == "ipo"
    cached = precompute_sequence_logprobs(reference, prepared, batch_size=3, average=average)
    source = cached_step_source(prepared, TrainConfig(batch_size=8, micro_batch_size=8), 0, cached)
    batch = source.next_step().micro_batches[0]
    assert_close(batch["ref_logprobs"], reference.sequence_logprobs(batch, average))
    assert_close(batch["ref_logprobs"], sequence_logprobs(tiny_model, batch, average))


@pytest.mark.parametrize("fmt", ["preference", "ranking"])
def test_padding_free_rows_capped_or_not_give_the_padded_sequence_logprobs(tiny_model, tokenizer, fmt):
    model = tiny_model.double().eval()
    layouts = {}
    for name, batch_mode, capacity, share in (("padded", "padded", 0, False), ("one_row", "padding_free", 0, True),
                                              ("capped", "padding_free", 96, True),
                                              ("one_row_whole", "padding_free", 0, False),
                                              ("capped_whole", "padding_free", 96, False)):
        prepared = prepare_data(DataConfig(source="arith", size=8, format=fmt, batch_mode=batch_mode,
                                           padding_free_capacity=capacity, share_prompts=share), tokenizer,
                                accepts=STAGE_FORMATS["dpo"], mask_dtype=torch.float64)
        batch = prepared.collator([prepared.dataset[i] for i in range(8)])
        assert ("predictors" in batch) is share  # shared prompts, or every sequence whole (`sample_ids`)
        layouts[name] = (batch["input_ids"].shape[0], sequence_logprobs(model, batch))
    assert layouts["one_row"][0] == layouts["one_row_whole"][0] == 1
    assert layouts["capped"][0] > 1 and layouts["capped_whole"][0] > 1
    for name in ("one_row", "capped", "one_row_whole", "capped_whole"):
        assert_close(layouts[name][1], layouts["padded"][1], msg=name)


def test_the_lora_disabled_reference_is_the_base_model(tiny_model, tokenizer):
    prepared = prepared_rows(tokenizer, "preference")
    batch = prepared.collator([prepared.dataset[i] for i in range(8)])
    base = copy.deepcopy(tiny_model).eval()
    policy = apply_adapter(tiny_model, AdapterConfig(method="lora", r=4))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = dpo_loss_fn(DPOLossConfig(), Reference(policy, adapter_disabled=True))(policy, batch, 8.0)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained = sequence_logprobs(policy.eval(), batch)
        want = sequence_logprobs(base, batch)
    assert not torch.allclose(trained, want)  # the adapter moved the policy...
    assert_close(Reference(policy, adapter_disabled=True).sequence_logprobs(batch), want)  # ...not the reference
    assert policy.training is False  # the reference restores the mode it found


def _accumulated_gradient(model, source, loss_fn) -> torch.Tensor:
    step = source.next_step()
    model.zero_grad()
    for micro_batch in step.micro_batches:
        loss, _ = loss_fn(model, micro_batch, step.normaliser)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(("fmt", "kind", "cached", "batch_mode"), [
    ("preference", "sigmoid", True, "padded"), ("ranking", "sigmoid", False, "padded"),
    ("preference", "robust", False, "padded"), ("preference", "sigmoid", True, "padding_free")])
def test_micro_batching_does_not_change_the_gradient(tiny_model, tokenizer, fmt, kind, cached, batch_mode):
    model = tiny_model.double()
    prepared = prepared_rows(tokenizer, fmt, size=4, batch_mode=batch_mode, dtype=torch.float64)
    reference = Reference.frozen_copy(model)
    with torch.no_grad():  # move the policy off the reference, so the loss is not at its symmetric point
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-2)
    loss_cfg = DPOLossConfig(kind=kind, beta=0.5, label_smoothing=0.1 if kind == "robust" else 0.0, sft_weight=0.3)
    cache = precompute_sequence_logprobs(reference, prepared, batch_size=4) if cached else None
    grads = []
    for micro in (4, 1):
        train = TrainConfig(batch_size=4, micro_batch_size=micro)
        source = (cached_step_source(prepared, train, 0, cache) if cached
                  else comparison_step_source(prepared, train, 0))
        grads.append(_accumulated_gradient(model, source, dpo_loss_fn(loss_cfg, None if cached else reference)))
    assert_close(grads[1], grads[0])


def test_plackett_luce_dpo_with_two_responses_is_pairwise_dpo_through_the_recipe(lm_dir, tmp_path):
    pairs = list(get_task("arith").rows("preference", size=32))
    rankings = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]} for r in pairs]
    runs = {}
    for name, rows in (("pairs", pairs), ("rankings", rankings)):
        source = tmp_path / f"{name}.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # Adam with a large epsilon: updates proportional to the gradient, so last-bit rounding differences
        # between the two losses are not amplified into sign flips of tiny gradient components. Padded, as the
        # reference pass is: padding-free pairs and rankings pack into different rows, so at step 1 (policy ==
        # reference) each implicit reward is rounding noise (~1e-7) whose sign, which reward_accuracy counts,
        # differs between the two layouts.
        runs[name] = main(dpo_config(lm_dir, tmp_path, f"run.name={name}", f"data.source={source}",
                                     "data.batch_mode=padded", "train.max_steps=3", "train.batch_size=16",
                                     "train.micro_batch_size=16", "optim.lr=1e-2", "optim.eps=1e-2", "loss.beta=0.5"))
    assert runs["rankings"].summary["format"] == "ranking"
    pair_metrics, ranking_metrics = (read_metrics(runs[n].run_dir / "metrics.jsonl") for n in ("pairs", "rankings"))
    assert abs(pair_metrics[-1]["loss"] - pair_metrics[0]["loss"]) > 1e-3  # it did train
    for key in ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "chosen_logprobs"):
        assert_close(torch.tensor([m[key] for m in ranking_metrics]), torch.tensor([m[key] for m in pair_metrics]))


def test_lora_with_a_live_adapter_disabled_reference_on_rankings(lm_dir, tmp_path):
    result = main(dpo_config(lm_dir, tmp_path, "data.size=16", "data.format=ranking", "adapter.method=lora",
                             "adapter.r=4", "reference.precompute=false", "train.max_steps=2", "train.batch_size=8",
                             "train.micro_batch_size=4", "optim.lr=1e-3"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    # LoRA starts as the identity, so the policy is the reference at step 1: the Plackett-Luce loss of
    # equal rewards over K = 4 responses is log 4! = log 24
    assert_close(torch.tensor(metrics[0]["loss"]), torch.tensor(math.log(24)))
    assert result.summary["trainable_parameters"] < 100_000
    AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)  # merged on save


def test_tied_rankings_take_breslows_likelihood_at_the_first_step(lm_dir, tmp_path):
    """Equal implicit rewards at the first step: each response's term is -log(its candidate pool's size). Ties
    (scores 3, 3, 1, 1: levels 0, 0, 1, 1) give pools 4, 4, 2, 2; the untied order would give log 4! = log 24."""
    rows = [{"prompt": f"What is {a}+1?", "responses": [str(a + 1), f"{a + 1}.", str(a), str(a + 2)],
             "scores": [3, 3, 1, 1]} for a in range(8)]
    source = tmp_path / "tied.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = main(dpo_config(lm_dir, tmp_path, f"data.source={source}", "train.max_steps=1", "train.batch_size=8",
                             "train.micro_batch_size=4", "optim.lr=1e-3", "eval.problems=0"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    assert_close(torch.tensor(metrics[0]["loss"]), torch.tensor(2 * math.log(4) + 2 * math.log(2)))


def test_rankings_take_only_the_sigmoid_loss(lm_dir, tmp_path):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="Plackett"):
        main(dpo_config(lm_dir, tmp_path, "data.size=8", "data.format=ranking", "loss.kind=hinge"))


class PairRecorder:
    """A reward of the completion text alone (a hash: nearly every completion scores differently) that writes down
    every scored completion with its score, in order."""

    def __init__(self) -> None:
        self.scored: list[tuple[str, str, float]] = []

    def __call__(self, batch) -> list[float]:
        values = [float(zlib.crc32(t.encode()) % 97) for t in batch.completions]
        self.scored += [(str(p), t, v) for p, t, v in zip(batch.prompts, batch.completions, values, strict=True)]
        return values


ON_POLICY = ["pairs.source=on_policy", "data.size=32", "pairs.prompts_per_round=16", "sampling.samples_per_prompt=4",
             "sampling.max_new_tokens=6", "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=1e-3",
             "reward.functions={test_pair_hash: 1.0}",
             "pairs.finished_only=false"]  # a random tiny model rarely ends within 6 tokens: pairs of cut ones too


_RECORDERS: list[PairRecorder] = []
register_reward_function("test_pair_hash")(lambda batch: _RECORDERS[-1](batch))


@pytest.fixture()
def recorder():
    """The recorder behind the `test_pair_hash` reward of this test."""
    _RECORDERS.append(PairRecorder())
    return _RECORDERS[-1]


def test_on_policy_pairs_are_each_prompts_best_and_worst_sample_resampled_every_k_steps(lm_dir, tmp_path, recorder,
                                                                                      monkeypatch):
    from posttrain.recipes import dpo

    trained: list[list[dict]] = []
    prepare = dpo.prepare_data

    def recording_prepare(cfg, tokenizer, accepts, rows=None, **kwargs):
        if rows is not None:
            trained.append(list(rows))
        return prepare(cfg, tokenizer, accepts, rows=rows, **kwargs)

    monkeypatch.setattr(dpo, "prepare_data", recording_prepare)
    result = main(dpo_config(lm_dir, tmp_path, *ON_POLICY, "train.max_steps=4", "pairs.resample_every=2"))
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    assert [m["pair_round"] for m in metrics] == [1, 1, 2, 2] and len(trained) == 2
    # Step 1: the policy is the reference (a frozen copy, since later rounds sample from the trained policy).
    assert_close(torch.tensor(metrics[0]["loss"]), torch.tensor(math.log(2)))
    for round_pairs, start in zip(trained, (0, 64), strict=True):
        scored = recorder.scored[start:start + 64]
        expected = []
        for group in range(16):  # 4 samples per prompt, prompt-major
            # an empty answer, or one with a stray <think> tag, pairs with none
            members = [m for m in scored[4 * group:4 * group + 4] if holds_as_answer(m[1])]
            if not members:
                continue
            best = max(members, key=lambda m: m[2])  # max/min return the first of equals
            worst = min(members, key=lambda m: m[2])
            if best[2] > worst[2]:
                expected.append((best[1], worst[1]))
        assert [(p["chosen"], p["rejected"]) for p in round_pairs] == expected
        assert metrics[2 * (start // 64)]["pairs_per_prompt"] == len(expected) / 16
    assert recorder.scored[0][1] != recorder.scored[64][1]  # the second round sampled afresh
    assert result.summary["pairs"] == "on_policy" and result.summary["rounds"] == 2


# Resampled every 2 steps (a checkpoint between rounds), and one round for the run (a checkpoint inside it: the
# resumed run must go on from where it was in the round's shuffled pairs, not from their start).
@pytest.mark.parametrize(("every", "rounds"), [(2, [1, 1, 2, 2]), (0, [1, 1, 1, 1])])
def test_on_policy_dpo_resumes_bitwise_from_a_checkpoint(lm_dir, tmp_path, recorder, resumes_bitwise, every, rounds):
    settings = [*ON_POLICY, "train.max_steps=4", f"pairs.resample_every={every}", "train.save_every=2"]
    full = main(dpo_config(lm_dir, tmp_path, "run.name=full", *settings))
    metrics = resumes_bitwise(full, lambda name: main(dpo_config(lm_dir, tmp_path, f"run.name={name}",
                                                                 "run.resume=true", *settings)))
    assert [m["pair_round"] for m in metrics] == rounds


@pytest.mark.parametrize(("overrides", "field"), [
    (["sampling.samples_per_prompt=1"], "sampling.samples_per_prompt"),
    (["pairs.resample_every=3", "train.save_every=4"], "train.save_every"),
    (["reference.precompute=false"], "reference.precompute"),
])
def test_on_policy_settings_are_checked_before_anything_loads(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        main(dpo_config("does-not-exist", tmp_path, *ON_POLICY, *overrides))
    assert err.value.field == field


def test_on_policy_round_without_a_pair_is_a_clear_error(lm_dir, tmp_path):
    with pytest.raises(DataError, match="no prompt's completions differ") as err:
        main(dpo_config(lm_dir, tmp_path, *ON_POLICY[:-1], "reward.functions={format: 1.0}",
                        "pairs.min_margin=1.0"))
    assert err.value.field == "pairs.source"


def test_on_policy_pairs_leave_out_cut_completions_and_resume_inside_a_round_on_its_prompts(
        lm_dir, tmp_path, recorder, monkeypatch):
    """Completions cut at max_new_tokens were paired, their text then ending with an end-of-turn token the policy
    never sampled. A signal's checkpoint inside a round resumed with a round sampled from the next prompts, one
    more round than the uninterrupted run had, all later ones shifted. User column renames and row limits applied
    to the generated pair rows (a crash after sampling, or pairs dropped)."""
    import os
    import signal

    from posttrain.recipes import dpo
    from posttrain.recipes.rl import preference_rows
    from posttrain.rewards.functions import Scores
    from posttrain.rewards.user_functions import Completions

    seen = []

    def recording(completions, scores, prompt_index, min_margin, finished=None):
        seen.append(finished)
        return preference_rows(completions, scores, prompt_index, min_margin)  # pairs enough to go on with

    monkeypatch.setattr(dpo, "preference_rows", recording)
    settings = [*ON_POLICY[:-1], "train.max_steps=6", "pairs.resample_every=2", "train.save_every=2", "data.limit=8",
                "pairs.prompts_per_round=8"]
    calls, make_loss = {"n": 0}, dpo.dpo_loss_fn

    def stopping_in_step_3(cfg, reference):
        loss_fn = make_loss(cfg, reference)

        def loss(model, batch, normaliser):
            calls["n"] += 1
            if calls["n"] == 5:  # step 3's first micro-batch (2 a step): it finishes, then stops with a checkpoint
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(model, batch, normaliser)
        return loss

    monkeypatch.setattr(dpo, "dpo_loss_fn", stopping_in_step_3)
    with pytest.raises(StoppedInTraining) as stopped:
        main(dpo_config(lm_dir, tmp_path, *settings))
    assert stopped.value.step == 4  # the stop waited for the round's last step
    monkeypatch.setattr(dpo, "dpo_loss_fn", make_loss)
    resumed = main(dpo_config(lm_dir, tmp_path, *settings, "run.resume=true"))
    metrics = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [m["pair_round"] for m in metrics] == [1, 1, 2, 2, 3, 3]
    assert all(f is not None and f.dtype == torch.bool for f in seen)  # cut completions are left out
    assert all(m["pairs_per_prompt"] > 0.5 for m in metrics)  # data.limit=8 limits prompts, not the round's pairs
    rows = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    kept = preference_rows(Completions(prompts=[rows[0]["prompt"]] * 2, completions=["a", "b"],
                                           answers=[None, None], steps=[[], []], columns=[{}, {}]),
                           Scores(torch.tensor([1.0, 0.0]), {}), torch.tensor([0, 0]), 0.0,
                           finished=torch.tensor([True, False]))
    assert kept == []  # the cut one pairs with none


def test_soft_labels_train_as_the_share_of_annotators_says(tiny_model, tokenizer, tmp_path):
    """preference_prob was read and never used: a pair labelled p=0 (the rejected answer preferred) trained as
    p=1. Now -(q log sigmoid(beta h) + (1 - q) log sigmoid(-beta h)), q = p (1 - e) + (1 - p) e; kinds without a
    soft form and label smoothing on rankings are refused."""
    from posttrain.recipes.dpo import check_pair_columns

    path = tmp_path / "soft.jsonl"
    probs = [1.0, 0.0, 0.7, 0.25]
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i),
                                        "preference_prob": p}) + "\n" for i, p in enumerate(probs)))
    prepared = prepare_data(DataConfig(source=str(path), batch_mode="padded"), tokenizer,
                            accepts=STAGE_FORMATS["dpo"])
    batch = prepared.collator([prepared.dataset[i] for i in range(4)])
    policy_model = copy.deepcopy(tiny_model)
    reference = Reference.frozen_copy(tiny_model)
    with torch.no_grad():
        for p in policy_model.parameters():  # a policy that differs from its reference: h != 0
            p.add_(0.01 * torch.randn_like(p))
    for smoothing in (0.0, 0.1):
        cfg = DPOLossConfig(beta=0.5, label_smoothing=smoothing, sft_weight=0.0)
        loss, _ = dpo_loss_fn(cfg, reference)(policy_model, batch, 4.0)
        policy = sequence_logprobs(policy_model, batch)
        ref = sequence_logprobs(reference.model, batch)
        h = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
        q = torch.tensor(probs) * (1 - smoothing) + (1 - torch.tensor(probs)) * smoothing
        expected = -(q * F.logsigmoid(0.5 * h) + (1 - q) * F.logsigmoid(-0.5 * h)).mean()
        assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="preference_prob .* sigmoid loss only"):
        check_pair_columns(prepared, DPOLossConfig(kind="ipo"))
    check_pair_columns(prepared, DPOLossConfig())
