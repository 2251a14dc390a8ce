"""The reward model: built from a causal LM's trunk, scored at the last real token on either padding
side, head-only training, MLP heads and LoRA survive saving and loading; the likelihood reward model is
the scaled log-likelihood of the response, trains the LM, saves as one and scores through the scorer."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.data.collate import collate_packed, collate_padded
from posttrain.errors import ConfigError
from posttrain.models import save_pretrained
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.reward import (
    build_reward_model,
    freeze_backbone,
    last_token_index,
    load_reward_model,
    sample_end_index,
    scores_at,
    sequence_scores,
)
from posttrain.models.value import build_value_model
from posttrain.rewards import RewardModelScorer


@pytest.fixture()
def lm_dir(tiny_model, tokenizer, tmp_path):
    return save_pretrained(tiny_model, tokenizer, tmp_path / "lm")


@pytest.fixture()
def samples(tokenizer):
    texts = ["What is 2+3? 5", "What is 12*7? 84 and more words here", "Hi"]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return [{"input_ids": i, "response_mask": [1] * len(i)} for i in ids]


def test_the_trunk_comes_from_the_causal_lm(tiny_model, lm_dir, tokenizer):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)
    lm_state = tiny_model.state_dict()
    for name, value in model.model.state_dict().items():
        assert_close(value, lm_state[f"model.{name}"], rtol=0, atol=0)
    assert model.score.weight.shape == (1, tiny_model.config.hidden_size)


def test_last_token_index_on_both_sides():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_scores_are_read_at_the_last_real_token_whatever_the_padding_side(lm_dir, tokenizer, samples):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    pad = tokenizer.pad_token_id
    right = sequence_scores(model, collate_padded(samples, pad, side="right"))
    left = sequence_scores(model, collate_padded(samples, pad, side="left"))
    alone = torch.cat([sequence_scores(model, collate_padded([s], pad)) for s in samples])
    assert_close(right, alone)
    assert_close(left, alone)
    # transformers' own forward agrees when the pad token is distinct from every real token
    hf = model(**{k: v for k, v in collate_padded(samples, pad).items() if k in ("input_ids", "attention_mask")})
    assert_close(hf.logits.squeeze(-1), alone)
    # and the score is the head applied at that position, nothing else
    batch = collate_padded(samples, pad)
    ends = last_token_index(batch["attention_mask"])
    assert_close(scores_at(model, batch, torch.stack([ends, ends - 1], 1))[:, 0], right)


def test_padding_free_batches_score_like_padded_ones(lm_dir, tokenizer, samples):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    packed = collate_packed([samples], tokenizer.pad_token_id)
    ends = torch.tensor([len(s["input_ids"]) for s in samples]).cumsum(0) - 1
    assert sample_end_index(packed["sample_ids"]).tolist() == ends.tolist()
    padded = collate_padded(samples, tokenizer.pad_token_id)
    assert_close(sequence_scores(model, packed), sequence_scores(model, padded))


def test_scores_of_sequences_packed_into_several_rows_come_back_in_sample_order(lm_dir, tokenizer, samples):
    """Capped padding-free rows: the odd samples fill row 0, the even ones row 1; scores stay in sample order."""
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    rows = [list(range(1, len(samples), 2)), list(range(0, len(samples), 2))]
    packed = collate_packed([[samples[i] for i in row] for row in rows], tokenizer.pad_token_id, indices=rows)
    width = packed["input_ids"].shape[1]
    expected = {}  # sample -> flat index of its last token, counted by hand
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            start += len(samples[i]["input_ids"])
            expected[i] = r * width + start - 1
    assert sample_end_index(packed["sample_ids"]).tolist() == [expected[i] for i in range(len(samples))]
    padded = collate_padded(samples, tokenizer.pad_token_id)
    assert_close(sequence_scores(model, packed), sequence_scores(model, padded))


def test_frozen_backbone_trains_the_head_only(lm_dir, tokenizer, samples):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)
    freeze_backbone(model)
    trunk = {k: v.clone() for k, v in model.model.state_dict().items()}
    head = model.score.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sequence_scores(model, collate_padded(samples, tokenizer.pad_token_id)).sum().backward()
    optimizer.step()
    for name, value in model.model.state_dict().items():
        assert_close(value, trunk[name], rtol=0, atol=0)
    assert not torch.equal(model.score.weight, head)


def test_mlp_head_saves_and_loads(lm_dir, tokenizer, samples, tmp_path):
    model = build_reward_model(lm_dir, head="mlp", head_width=32, pad_token_id=tokenizer.pad_token_id).eval()
    assert model.score[0].weight.shape == (32, model.config.hidden_size)
    batch = collate_padded(samples, tokenizer.pad_token_id)
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")
    assert_close(sequence_scores(load_reward_model(saved), batch), sequence_scores(model, batch))


def test_linear_head_loads_with_plain_transformers(lm_dir, tokenizer, samples, tmp_path):
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id).eval()
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(saved, local_files_only=True).eval()
    batch = collate_padded(samples, tokenizer.pad_token_id)
    assert_close(sequence_scores(plain, batch), sequence_scores(model, batch))


def test_lora_reward_model_trains_adapters_and_head_and_merges(lm_dir, tokenizer, samples, tmp_path):
    cfg = AdapterConfig(method="lora", r=4)
    model = apply_adapter(build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id), cfg, task_type="SEQ_CLS")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    batch = collate_padded(samples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sequence_scores(model, batch).sum().backward()
    optimizer.step()
    model.eval()
    saved = save_trained(model, tokenizer, tmp_path / "rm", cfg)
    merged = AutoModelForSequenceClassification.from_pretrained(saved, local_files_only=True).eval()
    assert_close(sequence_scores(merged, batch), sequence_scores(model, batch), rtol=1e-5, atol=1e-5)


def _hand_log_likelihoods(model, samples, scale: float, reduction: str = "sum") -> torch.Tensor:
    """scale * sum (or mean) of log p(token | everything before it) over each sample's masked tokens: one
    sequence a plain causal-LM forward, every position's full log-softmax, a Python loop over positions."""
    out = []
    for sample in samples:
        ids = torch.tensor([sample["input_ids"]])
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        picked = [logp[t - 1, ids[0, t]] for t in range(1, ids.shape[1]) if sample["response_mask"][t]]
        out.append(scale * sum(picked) / (len(picked) if reduction == "mean" else 1))
    return torch.stack(out).float()


@pytest.fixture()
def answered(samples):
    """The samples with only their second half trained (the "response"), the rest a prompt."""
    return [{**s, "response_mask": [int(i >= len(s["input_ids"]) // 2) for i in range(len(s["input_ids"]))]}
            for s in samples]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_likelihood_reward_is_the_scaled_log_likelihood_of_the_response_in_every_layout(lm_dir, tokenizer, answered,
                                                                                        reduction):
    model = build_reward_model(lm_dir, head="likelihood", reward_scale=0.5, pad_token_id=tokenizer.pad_token_id,
                               reward_reduction=reduction)
    model.eval()
    with torch.no_grad():
        want = _hand_log_likelihoods(model, answered, 0.5, reduction)
        pad = tokenizer.pad_token_id
        for batch in (collate_padded(answered, pad, side="right"), collate_padded(answered, pad, side="left"),
                      collate_packed([answered], pad)):
            assert_close(sequence_scores(model, batch), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="no head to read"):
        scores_at(model, collate_padded(answered, pad), torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_likelihood_reward_model_trains_the_causal_lm_saves_as_one_and_scores_through_the_scorer(
        lm_dir, tokenizer, answered, tmp_path, reduction):
    model = build_reward_model(lm_dir, head="likelihood", reward_scale=0.25, pad_token_id=tokenizer.pad_token_id,
                               reward_reduction=reduction)
    batch = collate_padded(answered, tokenizer.pad_token_id)
    before = model.lm_head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sequence_scores(model, batch).sum().backward()
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before)  # the reward's gradient reaches the LM itself
    model.eval()
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")
    plain = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
    assert plain.config.reward_head == "likelihood" and plain.config.reward_scale == 0.25
    assert plain.config.reward_reduction == reduction
    loaded = load_reward_model(saved)
    assert isinstance(loaded, type(plain))
    with torch.no_grad():
        want = _hand_log_likelihoods(plain, answered, 0.25, reduction)
        assert_close(sequence_scores(loaded, batch), want, rtol=1e-5, atol=1e-4)
        scorer = RewardModelScorer(loaded, tokenizer)
        assert_close(scorer.score_tokens(batch["input_ids"], batch["attention_mask"], batch["response_mask"]), want,
                     rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="pass response_mask"):
        scorer.score_tokens(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ConfigError, match="critic.init=policy"):
        build_value_model(saved, "reward_model")


def test_likelihood_reward_model_with_lora_merges_into_a_causal_lm(lm_dir, tokenizer, answered, tmp_path):
    cfg = AdapterConfig(method="lora", r=4)
    model = apply_adapter(build_reward_model(lm_dir, head="likelihood", pad_token_id=tokenizer.pad_token_id), cfg)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = collate_padded(answered, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sequence_scores(model, batch).sum().backward()
    optimizer.step()
    model.eval()
    merged = load_reward_model(save_trained(model, tokenizer, tmp_path / "rm", cfg))
    with torch.no_grad():
        assert_close(sequence_scores(merged, batch), sequence_scores(model, batch), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- scorers on what a policy produces


def _random_head(model):
    with torch.no_grad():  # a fresh head scores ~0 everywhere; a random one tells tokens apart
        model.score.weight.normal_(generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("which", ["project", "chatml", "phi3"])
def test_score_tokens_reads_where_training_rows_end_as_score_does(which, lm_dir, tokenizer, request):
    """ChatML ends an answer `<|im_end|>\\n` and the head learned at the newline; a policy's ids stop at
    `<|im_end|>`, or earlier when cut off. score_tokens once read those at their last token (another token than
    training's), so the same answer scored differently as ids and as text. Phi-3 ends it `<|end|>\\n<|endoftext|>`
    and a policy stops at `<|end|>`: the ending once taken was the last of those, so nothing was added."""
    from posttrain.data.schemas import message

    directory, tok = ((lm_dir, tokenizer) if which == "project" else
                      (request.getfixturevalue(f"{which}_model_dir"), request.getfixturevalue(f"{which}_tokenizer")))
    scorer = RewardModelScorer(_random_head(build_reward_model(directory, pad_token_id=tok.pad_token_id)), tok)
    prompts, answers = ["What is 2+3?", "What is 12*7?"], ["The answer is 5", "84"]
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = scorer.encoder.encode_prompt([message("user", prompt)])
        whole, mask = scorer.encoder.encode([message("user", prompt), message("assistant", answer)], prompt_turns=1)
        completion = whole[len(prompt_ids):]  # the answer's tokens as the template tokenises them
        stop = next(i for i, t in enumerate(completion) if t in scorer.encoder.closers)
        rows += [prompt_ids + completion[:stop + 1], prompt_ids + completion[:stop]]  # stopped; cut off before it
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left padded, as sampled
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    want = scorer.score([p for p in prompts for _ in range(2)], [a for a in answers for _ in range(2)])
    assert_close(scorer.score_tokens(ids, attention), want)


def test_a_completion_the_reward_model_cannot_render_is_an_error_of_its_row_alone(lm_dir, tokenizer):
    """A policy can spell a special token (`<|end|>`) out of ordinary tokens: its decoded text cannot be rendered as
    the training rows were. Only that row errs (it scored the whole batch 0 and stopped the run before)."""
    from posttrain.errors import DataError
    from posttrain.rewards.functions import Completions, WeightedRewards, reward_model_reward

    directory = lm_dir.parent / "rm"
    save_pretrained(_random_head(build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)), tokenizer,
                    directory)
    special = next(t for t in tokenizer.all_special_tokens if t not in (tokenizer.bos_token, tokenizer.eos_token))
    completions = ["5", f"x {special} y", "7 and more"]
    batch = Completions(prompts=[[{"role": "user", "content": "What is 2+3?"}]] * 3, completions=completions,
                        answers=[None] * 3, steps=[[]] * 3)
    scores = WeightedRewards({"rm": (reward_model_reward(str(directory)), 1.0)})(batch)
    scorer = RewardModelScorer.from_pretrained(directory)
    alone = scorer.score(["What is 2+3?"] * 2, [completions[0], completions[2]])
    assert_close(scores.total[[0, 2]], alone.double())
    assert scores.total[1] == 0 and [e["row"] for e in scores.errors] == [1]
    assert special in scores.errors[0]["error"]
    with pytest.raises(DataError, match="completion 1: the reward model cannot score it"):
        scorer.score(["What is 2+3?"] * 3, completions)


def test_a_reward_model_scoring_nan_or_inf_errs_on_those_rows(lm_dir, tokenizer, monkeypatch):
    """A diverged reward model's NaN trained silently as reward 0 (and an inf as the largest float): each is an
    error of its row, counted towards reward.max_error_fraction like a grader's."""
    from posttrain.rewards.functions import Completions, WeightedRewards, reward_model_reward

    directory = lm_dir.parent / "rm-nan"
    save_pretrained(_random_head(build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)), tokenizer,
                    directory)
    scored = torch.tensor([0.25, float("nan"), float("inf")])
    monkeypatch.setattr(RewardModelScorer, "score_rows", lambda self, prompts, completions, tools=None: (scored,
                                                                                                       [None] * 3))
    batch = Completions(prompts=[[{"role": "user", "content": "What is 2+3?"}]] * 3, completions=["5", "6", "7"],
                        answers=[None] * 3, steps=[[]] * 3)
    scores = WeightedRewards({"rm": (reward_model_reward(str(directory)), 1.0)})(batch)
    assert scores.total.tolist() == [0.25, 0.0, 0.0]
    assert [(e["row"], e["error"]) for e in scores.errors] == [(1, "the reward model scored it nan"),
                                                               (2, "the reward model scored it inf")]


def test_what_is_no_scalar_reward_model_is_refused_when_it_loads_naming_the_setting(lm_dir, tokenizer, tmp_path):
    """A classifier of two labels (transformers' default) and a causal LM (whose score head transformers would start
    at random) used as reward models failed mid-run with a traceback; a missing directory named model.path."""
    two = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=2, local_files_only=True)
    two.config.pad_token_id = tokenizer.pad_token_id
    two_dir = save_pretrained(two, tokenizer, tmp_path / "two-labels")
    for path, says in ((two_dir, "2 outputs"), (lm_dir, "no trained reward head"),
                       (tmp_path / "nowhere", "nowhere does not exist")):
        with pytest.raises(ConfigError, match=says) as caught:
            RewardModelScorer.from_pretrained(path)
        assert caught.value.field == "reward.model_path"
    with pytest.raises(ConfigError, match="2 outputs") as caught:
        load_reward_model(two_dir, field="critic.path")
    assert caught.value.field == "critic.path"
    one = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)  # a reward model still loads
    assert load_reward_model(save_pretrained(one, tokenizer, tmp_path / "rm")).config.num_labels == 1


def test_a_scorers_model_with_custom_code_says_posttrain_does_not_run_it(lm_dir, tmp_path):
    import json
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(lm_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "mything",
                                                    "auto_map": {"AutoConfig": "code.MyConfig"}}))
    with pytest.raises(ConfigError, match="posttrain does not run for this model") as caught:
        RewardModelScorer.from_pretrained(custom)
    assert caught.value.field == "reward.model_path"


def test_an_outcome_reward_model_is_refused_as_a_process_reward_model(lm_dir, tokenizer, tmp_path):
    """Read at each step's end, an outcome model's one score per response is no step's probability; a process
    reward model (`process_target` saved) and a classifier saved elsewhere (no posttrain settings) still load."""
    from posttrain.rewards import ProcessRewardScorer

    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)
    model.config.reward_rendering = {"template": "chat", "thinking": "on"}  # as `posttrain rm` saves it
    outcome = save_pretrained(model, tokenizer, tmp_path / "outcome")
    with pytest.raises(ConfigError, match="outcome reward model") as caught:
        ProcessRewardScorer.from_pretrained(outcome)
    assert caught.value.field == "advantage.prm_path"
    model.config.process_target = "classification"
    assert ProcessRewardScorer.from_pretrained(save_pretrained(model, tokenizer, tmp_path / "process")).target == (
        "classification")
    del model.config.reward_rendering, model.config.process_target
    ProcessRewardScorer.from_pretrained(save_pretrained(model, tokenizer, tmp_path / "elsewhere"))


def test_a_reward_model_from_elsewhere_whose_tokenizer_has_no_chat_template_scores_plain_text(lm_dir, tokenizer,
                                                                                              tmp_path):
    """It could not be used at all: the scorer asked for the chat template, and the advice (data.template=plain)
    reaches only the policy. Without a saved rendering and a chat template, it renders as plain text, what the
    explicit plain setting gives; a model saved by `posttrain rm` still renders as it was trained."""
    import copy

    from posttrain.data.config import DataConfig
    from posttrain.rewards.reward_model import scoring_config

    plain_tokenizer = copy.deepcopy(tokenizer)
    plain_tokenizer.chat_template = None
    model = build_reward_model(lm_dir, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.score.weight.normal_()  # a head that tells texts apart
    path = save_pretrained(model, plain_tokenizer, tmp_path / "rm")
    prompts, completions = ["What is 2+3?", "What is 12*7?"], [" 5", " 84"]
    scorer = RewardModelScorer.from_pretrained(path)
    explicit = DataConfig(template="plain", truncation="truncate_left", max_length=scoring_config(model).max_length)
    reference = RewardModelScorer.from_pretrained(path, data=explicit)
    assert_close(scorer.score(prompts, completions), reference.score(prompts, completions))
    assert scoring_config(model, plain_tokenizer).template == "plain" and scoring_config(model, tokenizer).template == (
        "chat")
    model.config.reward_rendering = {"template": "chat", "thinking": "on"}
    assert scoring_config(model, plain_tokenizer).template == "chat"


@pytest.mark.parametrize("head", ["linear", "likelihood"])
def test_a_scorer_lays_the_prompt_of_its_completions_out_once_and_scores_as_one_sequence_a_row(
        head, lm_dir, tokenizer, monkeypatch, float64_norms):
    """GRPO's groups: the completions of one prompt go through the reward model's forward with the prompt once
    (`collate_shared_prompts`), and score what one sequence per padded row scores, in float64."""
    from posttrain.data.collate import shared_prefix_length
    from posttrain.rewards import reward_model

    model = build_reward_model(lm_dir, head=head, pad_token_id=tokenizer.pad_token_id)
    model = (_random_head(model) if head == "linear" else model).double()
    float64_norms(model)
    batches = []
    real = reward_model.collate_sequences
    monkeypatch.setattr(reward_model, "collate_sequences", lambda *args: batches.append(real(*args)) or batches[-1])
    prompts = ["What is 2+3?"] * 3 + ["What is 12*7?"] * 2
    completions = ["5", "6", "The answer is 5", "84", "It is 84"]
    scorer = RewardModelScorer(model, tokenizer)
    scores = scorer.score(prompts, completions)
    (batch,) = batches
    encoded = [scorer.encode(p, c)[0] for p, c in zip(prompts, completions, strict=True)]
    shared = [shared_prefix_length(encoded[:3]), shared_prefix_length(encoded[3:])]  # each prompt (and more) once
    assert min(shared) > 5
    assert int((batch["segment_ids"] >= 0).sum()) == sum(map(len, encoded)) - 2 * shared[0] - shared[1]
    scorer.packs = False  # one sequence per padded row
    assert_close(scores, scorer.score(prompts, completions), rtol=1e-12, atol=1e-12)
    assert "attention_mask" in batches[-1] and batches[-1]["attention_mask"].dim() == 2
