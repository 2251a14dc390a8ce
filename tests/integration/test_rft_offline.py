"""Offline RFT: 0/1 scores train exactly like SFT on the responses scored 1; partial credit gives the weighted
NLL computed token by token; a run scores every response of a built-in task and trains on those scored > 0."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import ModelConfig, load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.data.tasks import get_task
from posttrain.errors import ConfigError
from posttrain.models import build_model, save_pretrained
from posttrain.recipes import find_recipe
from posttrain.recipes.rft import RFTConfig, main
from posttrain.recipes.rft_offline import load_candidates, score_candidates, weighted_step_source
from posttrain.recipes.rl import RewardConfig, build_rewards
from posttrain.recipes.sft import sft_loss_fn, step_source
from posttrain.rewards.functions import WeightedRewards
from posttrain.train.engine import TrainConfig


def test_zero_one_scores_train_exactly_like_sft_on_the_responses_scored_one(tiny_model, tokenizer):
    data = DataConfig(source="arith", size=6)
    candidates = load_candidates(data)  # per problem: the correct completion and 3 plausible wrong ones
    assert len(candidates) == 24 and sum(c.text == c.answer for c in candidates) == 6
    scores = score_candidates(candidates, build_rewards(RewardConfig(functions={"correct": 1.0}), get_task("arith")))
    assert scores.total.tolist() == [float(c.text == c.answer) for c in candidates]
    train = TrainConfig(batch_size=4, micro_batch_size=4)
    offline, trained = weighted_step_source(candidates, scores.total.tolist(), data, tokenizer, train, seed=0)
    sft = step_source(prepare_data(data, tokenizer, accepts=STAGE_FORMATS["sft"]), train, 0)
    assert trained == 6
    for _ in range(3):  # across an epoch boundary: the same rows in the same order
        ours, theirs = offline.next_step(), sft.next_step()
        assert ours.normaliser == theirs.normaliser
        ours_loss, _ = sft_loss_fn(tiny_model, ours.micro_batches[0], ours.normaliser)
        sft_loss, _ = sft_loss_fn(tiny_model, theirs.micro_batches[0], theirs.normaliser)
        assert torch.equal(ours_loss, sft_loss)


def test_partial_credit_gives_the_weighted_nll_by_hand(tiny_model, tokenizer, tmp_path):
    rows = [("What is 2+3?", "5", "5"), ("What is 2+3?", "6", "5"), ("What is 7*8?", "54", "56"),
            ("What is 7*8?", "no idea", "56"), ("What is 9-4?", "5", "5")]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c, "answer": a}) + "\n" for p, c, a in rows))
    candidates = load_candidates(DataConfig(source=str(path)))
    rewards = build_rewards(RewardConfig(functions={"grader": 1.0}, grader="arith-partial"), None)
    weights = score_candidates(candidates, rewards).total.tolist()
    # arith-partial: 0.7 * exact + 0.3 / (1 + |error|); no number at all scores 0.
    assert weights == pytest.approx([1.0, 0.15, 0.1, 0.0, 1.0])
    source, trained = weighted_step_source(candidates, weights, DataConfig(), tokenizer,
                                           TrainConfig(batch_size=4, micro_batch_size=4), seed=0)
    assert trained == 4  # the response scoring 0 is left out
    step = source.next_step()
    loss, _ = sft_loss_fn(tiny_model, step.micro_batches[0], step.normaliser)
    # By hand: sum_i w_i * NLL(completion_i + EOS | prompt_i) / sum_{w_i > 0} (tokens of completion_i + EOS): the
    # normaliser counts tokens, so a step of near misses alone does not train as hard as one of right answers.
    weighted_nll, tokens = 0.0, 0
    for (prompt, completion, _), weight in zip(rows, weights, strict=True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([prompt_ids + target])).logits[0].double()
        logprobs = logits[len(prompt_ids) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(target).unsqueeze(1))
        weighted_nll -= weight * logprobs.sum().item()
        tokens += len(target) if weight > 0 else 0
    assert step.normaliser == tokens
    assert loss.item() == pytest.approx(weighted_nll / tokens, rel=1e-5)


def test_negative_rewards_are_refused_as_weights():
    candidates = load_candidates(DataConfig(source="arith", size=2))
    negative = WeightedRewards({"minus": (lambda batch: [-0.5] * len(batch.completions), 1.0)})
    with pytest.raises(ConfigError, match="reward.functions"):
        score_candidates(candidates, negative)


def test_a_response_some_reward_failed_on_weighs_zero_not_the_other_functions_share():
    candidates = load_candidates(DataConfig(source="arith", size=2))[:6]
    rewards = WeightedRewards({"flat": (lambda batch: [0.25] * len(batch), 1.0),
                               "flaky": (lambda batch: [float("nan") if i % 3 == 0 else 0.5
                                                        for i in range(len(batch))], 1.0)})
    scores = score_candidates(candidates, rewards)
    assert scores.total.tolist() == [0.0, 0.75, 0.75, 0.0, 0.75, 0.75]  # not 0.25 where "flaky" failed
    assert [e["row"] for e in scores.errors] == [0, 3]


def test_an_offline_run_scores_every_response_and_trains_on_the_credited(tokenizer, tmp_path):
    model_dir = save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer,
                                tmp_path / "lm")
    overrides = [f"model.path={model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "train.save_every=0",
                 "mode=offline", "data.size=8", "train.max_steps=2", "train.batch_size=4",
                 "train.micro_batch_size=4", "eval.problems=4", "eval.max_new_tokens=4", "eval_before=false"]
    result = main(load_config(RFTConfig, find_recipe("rft").path, overrides))
    scored = [json.loads(line) for line in (result.run_dir / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 8 * 4 and {"reward", "rewards", "completion", "answer"} <= set(scored[0])
    for record in scored:  # the shipped arith-partial grader: full marks exactly for the right answer
        assert (record["reward"] == 1.0) == (record["completion"] == record["answer"])
    # Every wrong arith answer is a number near the truth: all 32 get some credit and train, with their weights.
    assert result.summary["trained_responses"] == sum(r["reward"] > 0 for r in scored) == 32
    assert result.summary["mean_weight"] == pytest.approx(sum(r["reward"] for r in scored) / 32)
    assert result.summary["steps"] == 2 and (result.final_dir / "config.json").is_file()


def test_an_offline_run_resumed_on_an_edited_candidates_file_is_refused(tokenizer, tmp_path):
    """Its rows reach the trainer in memory (scored pairs), which carry no digest: an edited file of as many rows
    trained on, silently. The candidates as read are digested now; the same file resumes."""
    model_dir = save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer,
                                tmp_path / "lm")
    rows = [{"prompt": f"What is {i}+{i}?", "completion": str(2 * i + i % 2), "answer": str(2 * i)} for i in range(8)]
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [f"model.path={model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "train.save_every=0",
                 "mode=offline", f"data.source={path}", "reward.functions={correct: 1.0}", "reward.task=arith",
                 "train.batch_size=2", "train.micro_batch_size=2", "eval.problems=0", "eval_before=false"]
    main(load_config(RFTConfig, find_recipe("rft").path, [*overrides, "train.max_steps=2"]))
    resumed = [*overrides, "train.max_steps=3", "run.resume=true"]
    edited = [{"prompt": "What is 9+9?", "completion": "18", "answer": "18"}, *rows[1:]]  # as many rows, as many right
    path.write_text("".join(json.dumps(row) + "\n" for row in edited))
    with pytest.raises(ConfigError, match="other rows of training data") as info:
        main(load_config(RFTConfig, find_recipe("rft").path, resumed))
    assert info.value.field == "data"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(load_config(RFTConfig, find_recipe("rft").path, resumed)).summary["steps"] == 3


def test_offline_reward_errors_are_kept_and_a_mostly_failing_reward_stops_before_the_run_exists(tokenizer, tmp_path,
                                                                                                 capsys):
    """Every fourth response's reward is NaN: scored 0, printed once, and each kept in grader_errors.jsonl like an
    online run's; when every response fails, the run stops before anything on disk is touched."""
    model_dir = save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer,
                                tmp_path / "lm")
    (tmp_path / "flaky.py").write_text(
        "def some(batch):\n    return [float('nan') if i % 4 == 0 else 1.0 for i in range(len(batch))]\n\n"
        "def every(batch):\n    return [float('nan')] * len(batch)\n")
    overrides = [f"model.path={model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "train.save_every=0",
                 "mode=offline", "data.size=8", "train.max_steps=1", "train.batch_size=4",
                 "train.micro_batch_size=4", "eval.problems=0", "eval_before=false"]
    result = main(load_config(RFTConfig, find_recipe("rft").path,
                              [*overrides, f"reward.functions={{{tmp_path / 'flaky.py'}:some: 1.0}}"]))
    errors = [json.loads(line) for line in (result.run_dir / "grader_errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == list(range(0, 32, 4)) and all("nan" in e["error"] for e in errors)
    assert result.summary["grader_errors"] == 8 and capsys.readouterr().err.count("failed on a sample") == 1
    with pytest.raises(ConfigError, match=r"32 of 32 scores of this batch are errors.*none kept"):
        main(load_config(RFTConfig, find_recipe("rft").path,
                         [*overrides, "run.name=every", f"reward.functions={{{tmp_path / 'flaky.py'}:every: 1.0}}"]))
    assert not (tmp_path / "every").exists()


def test_offline_rewards_and_graders_read_every_column_of_the_row(tmp_path):
    """A TRL-style function gets the row's other columns as keyword lists, a grader reads them as item.<column>,
    and a template naming a column the rows lack is refused before anything is scored."""
    rows = [{"prompt": "What is 3+4?", "completion": "7", "answer": "7", "solution": "7"},
            {"prompt": "What is 3+4?", "completion": "8", "answer": "7", "solution": "7"},
            {"prompt": "What is 2*5?", "completion": "it is 10", "answer": "10", "solution": "10"}]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    candidates = load_candidates(DataConfig(source=str(path)))
    assert [c.columns["solution"] for c in candidates] == ["7", "7", "10"]
    trl_style = build_rewards(RewardConfig(functions={"examples/rewards.py:matches_solution": 1.0}), None)
    assert score_candidates(candidates, trl_style).total.tolist() == [1.0, 0.0, 1.0]
    grader = tmp_path / "solution.yaml"
    grader.write_text('type: string_check\noperation: eq\ninput: "{{ sample.output_text }}"\n'
                      'reference: "{{ item.solution }}"\n')
    graded = build_rewards(RewardConfig(functions={"grader": 1.0}, grader=str(grader)), None)
    graded.check_grader_columns(candidates[0].columns)
    assert score_candidates(candidates, graded).total.tolist() == [1.0, 0.0, 0.0]
    grader.write_text('type: string_check\noperation: eq\ninput: "{{ sample.output_text }}"\n'
                      'reference: "{{ item.gold }}"\n')
    with pytest.raises(ConfigError, match="item.gold"):
        build_rewards(RewardConfig(functions={"grader": 1.0}, grader=str(grader)), None).check_grader_columns(
            candidates[0].columns)


def test_a_weight_is_absolute_not_relative_to_its_steps_other_rows(tiny_model, tokenizer):
    """With the normaliser sum_i w_i n_i, a step of rows all weighted 0.1 trained exactly as hard as one weighted 1:
    partial credit only counted against the other rows of its step (with batch_size=1, not at all)."""

    rows = [{"prompt": f"What is {a}+{a}?", "completion": str(2 * a)} for a in range(1, 5)]
    prepared = prepare_data(DataConfig(source="<rows>"), tokenizer, accepts=("completion",), rows=rows)
    train = TrainConfig(batch_size=4, micro_batch_size=4)
    losses = {}
    for weight in (1.0, 0.1):
        step = step_source(prepared, train, 0, [weight] * 4).next_step()
        losses[weight] = sft_loss_fn(tiny_model, step.micro_batches[0], step.normaliser)[0]
    torch.testing.assert_close(losses[0.1], 0.1 * losses[1.0])


@pytest.mark.parametrize("failing, stops", [(4, False), (5, True)])
def test_sharded_scoring_judges_the_error_share_of_the_whole_set(monkeypatch, failing, stops):
    """Under torchrun each rank scores its share and every rank gets all the scores; reward.max_error_fraction is of
    the whole set (a rank whose own share failed past it stopped alone, and the other rank waited for it). Here: rank
    1 of 2, the other rank's 4 rows scored, this rank's errors `failing` of 8 in all."""
    import types

    from posttrain.recipes import rft_offline
    from posttrain.rewards.error_log import RewardErrorLog
    from posttrain.rewards.functions import Scores

    candidates = load_candidates(DataConfig(source="arith", size=2))[:8]
    other = Scores(total=torch.ones(4, dtype=torch.float64) * (0.0 if failing == 5 else 1.0),
                   by_function={"f": torch.ones(4, dtype=torch.float64)},
                   errors=[{"function": "f", "row": 0, "error": "ValueError: other rank"}] if failing == 5 else [])
    monkeypatch.setattr(rft_offline.dist, "context", lambda: types.SimpleNamespace(world_size=2, rank=1))
    monkeypatch.setattr(rft_offline.dist, "all_gather_list",
                        lambda items: [(other.total, other.by_function, other.errors), *items])
    rewards = WeightedRewards({"f": (lambda batch: [float("nan")] * len(batch), 1.0)})
    rewards.error_log = RewardErrorLog(None, max_error_fraction=0.5, echo=lambda text: None)
    if stops:
        with pytest.raises(ConfigError, match="reward.functions.f: 5 of 8 scores"):
            score_candidates(candidates, rewards)
    else:
        scores = score_candidates(candidates, rewards)  # 4 of this rank's 4 rows failed: half the set
        assert scores.total.tolist() == [1.0] * 4 + [0.0] * 4 and [e["row"] for e in scores.errors] == [4, 5, 6, 7]
    assert not rewards.error_log.deferred


def test_tool_rows_train_with_their_tools_as_sft_renders_them_and_scored_records_keep_them(chatml_tokenizer,
                                                                                           tmp_path):
    """Offline RFT built its rows from prompt and completion alone: a tool row trained without the tool schemas
    the chat template writes (and `posttrain sft` renders the same file with)."""
    from posttrain.recipes.rft_offline import scored_records

    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "completion": str(a + b),
             "answer": str(a + b), "tools": tools} for a, b in ((2, 3), (4, 4))]
    path = tmp_path / "tool_rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataConfig(source=str(path))
    candidates = load_candidates(data)
    source, trained = weighted_step_source(candidates, [1.0, 1.0], data, chatml_tokenizer,
                                           TrainConfig(batch_size=2, micro_batch_size=2), seed=0)
    sft = prepare_data(data, chatml_tokenizer, accepts=STAGE_FORMATS["sft"])
    assert trained == 2
    ours = sorted(tuple(source.collate([i])["input_ids"][0].tolist()) for i in range(2))
    theirs = sorted(tuple(sft.collator([sft.dataset[i]])["input_ids"][0].tolist()) for i in range(2))
    assert ours == theirs and "<tools>" in chatml_tokenizer.decode(list(ours[0]))
    scores = score_candidates(candidates, build_rewards(RewardConfig(functions={"correct": 1.0}), get_task("arith")))
    assert [r["tools"] for r in scored_records(candidates, scores)] == [tools, tools]
