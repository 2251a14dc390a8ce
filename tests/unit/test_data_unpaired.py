"""The unpaired row format (KTO): labels, format detection beside completion rows, the mismatched pair of every
row, and its collation as a pair."""

from __future__ import annotations

import json

import pytest

from posttrain.data import DataConfig, load_rows, prepare_data
from posttrain.data.config import STAGE_FORMATS
from posttrain.data.tasks import TASKS, get_task
from posttrain.data.tokenize import _next_other
from posttrain.errors import DataError


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_labels_may_be_booleans_or_zero_and_one(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+3?", "completion": "6", "label": 0},
            {"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}],
             "label": 1}, {"prompt": "3+3?", "completion": "7", "label": False}]
    loaded = load_rows(DataConfig(source=write_jsonl(tmp_path / "u.jsonl", rows)), STAGE_FORMATS["kto"])
    assert loaded.format == "unpaired"
    assert loaded.dataset["label"] == [True, False, True, False]
    assert loaded.dataset[2]["completion"][0]["content"] == "2"


@pytest.mark.parametrize("label", ["yes", "true", 2, 0.5, -1, [True], None])
def test_anything_else_is_a_data_error_naming_file_line_and_field(tmp_path, label):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+3?", "completion": "6", "label": label}]
    source = write_jsonl(tmp_path / "u.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_rows(DataConfig(source=source), STAGE_FORMATS["kto"])
    assert (err.value.file, err.value.line, err.value.field) == (source, 2, "label")


def test_csv_labels_are_read_as_json(tmp_path):
    source = tmp_path / "u.csv"
    source.write_text("prompt,completion,label\n2+2?,4,true\n2+3?,6,0\n")
    assert load_rows(DataConfig(source=str(source)), STAGE_FORMATS["kto"]).dataset["label"] == [True, False]


def test_detection_keeps_completion_rows_completion_and_asks_kto_for_a_label(tmp_path):
    completion = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "2+2?", "completion": "4", "label": True}])
    both = ("completion", "unpaired")
    assert load_rows(DataConfig(source=completion), both).format == "completion"
    assert load_rows(DataConfig(source=unpaired), both).format == "unpaired"
    assert load_rows(DataConfig(source=unpaired), STAGE_FORMATS["sft"]).format == "completion"
    with pytest.raises(DataError, match="missing column 'label'") as err:
        load_rows(DataConfig(source=completion), STAGE_FORMATS["kto"])
    assert err.value.field == "label"


@pytest.mark.parametrize("keys", ["abcd", "aabb", "aaaa", "abab", "aabaa", "abbba", "a", "ab", "aaab"])
def test_the_pair_of_a_row_is_the_next_row_with_another_prompt(keys):
    n = len(keys)
    want = []
    for i in range(n):
        later = [(i + k) % n for k in range(1, n + 1)]
        want.append(next((j for j in later if keys[j] != keys[i]), (i + 1) % n))
    assert _next_other(list(keys)) == want


def test_every_row_carries_its_prompt_with_the_next_prompts_completion(tmp_path, tokenizer):
    rows = [{"prompt": "What is 2+2?", "completion": "4", "label": True},
            {"prompt": "What is 2+2?", "completion": "5", "label": False},  # the same prompt: skipped as a pair
            {"prompt": "What is 7*3?", "completion": "21", "label": True}]
    prepared = prepare_data(DataConfig(source=write_jsonl(tmp_path / "u.jsonl", rows), template="plain"), tokenizer,
                            accepts=STAGE_FORMATS["kto"])
    data = prepared.dataset

    def split(ids, mask):
        start = mask.index(1)
        return tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:])

    prompts, completions = zip(*(split(r["input_ids"], r["response_mask"]) for r in data), strict=True)
    pairs = [split(r["kl_input_ids"], r["kl_response_mask"]) for r in data]
    assert pairs == [(prompts[0], completions[2]), (prompts[1], completions[2]), (prompts[2], completions[0])]
    for row in data:  # the pair's trained tokens are exactly the partner's
        assert sum(row["kl_response_mask"]) > 0

    batch = prepared.collator([data[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6  # the 3 rows, then their 3 pairs
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["input_ids"][3, :len(data[0]["kl_input_ids"])].tolist() == data[0]["kl_input_ids"]


def test_a_pair_too_long_is_cut_from_the_left_keeping_bos(tmp_path, tokenizer):
    rows = [{"prompt": "What is 2+2? " * 6, "completion": "4", "label": True},
            {"prompt": "Hi", "completion": "a long answer " * 6, "label": False}]
    source = write_jsonl(tmp_path / "u.jsonl", rows)
    full = prepare_data(DataConfig(source=source, template="plain"), tokenizer, accepts=STAGE_FORMATS["kto"])
    longest = max(len(ids) for ids in full.dataset["input_ids"])
    cut = prepare_data(DataConfig(source=source, template="plain", max_length=longest), tokenizer,
                       accepts=STAGE_FORMATS["kto"]).dataset[0]
    assert len(full.dataset[0]["kl_input_ids"]) > longest  # row 0's long prompt with row 1's long answer
    assert len(cut["kl_input_ids"]) == longest and cut["kl_input_ids"][0] == tokenizer.bos_token_id
    assert cut["kl_input_ids"][-sum(cut["kl_response_mask"]):] == full.dataset[0]["kl_input_ids"][
        -sum(full.dataset[0]["kl_response_mask"]):]


@pytest.mark.parametrize("name", list(TASKS))
def test_task_unpaired_rows_are_labelled_by_the_verifier(name):
    task = get_task(name)
    rows = list(task.rows("unpaired", size=40, seed=3))
    assert {r["label"] for r in rows} == {True, False}
    gold = {r["prompt"]: task.extract_answer(p["chosen"]) for r, p in
            zip(rows, task.rows("preference", size=40, seed=3), strict=True)}
    for row in rows:
        assert task.verify(row["completion"], gold[row["prompt"]]) == float(row["label"])
