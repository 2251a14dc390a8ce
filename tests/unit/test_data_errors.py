"""Every bad input a user can hand the data layer is a DataError naming file, line (or row) and field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain.data import DataConfig, load_rows, prepare_data
from posttrain.data.config import STAGE_FORMATS, ColumnsConfig
from posttrain.errors import ConfigError, DataError

SFT = STAGE_FORMATS["sft"]
RM = STAGE_FORMATS["rm"]


def _cfg(tmp_path: Path, source: Path | str, **kwargs) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kwargs)


def _jsonl(tmp_path: Path, *rows, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _raises(cfg: DataConfig, accepts=SFT, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_rows(cfg, accepts, **kwargs)
    return info.value


GOOD = {"prompt": "What is 2+3?", "completion": "5"}
PAIR = {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}

# (case id, rows of a .jsonl file, formats the stage takes, line, field, words in the message)
JSONL_CASES = [
    ("invalid-json", [GOOD, GOOD, '{"prompt": "x", "completion": }'], SFT, 3, None, "invalid JSON"),
    ("row-not-object", [GOOD, "[1, 2]"], SFT, 2, None, "must be an object"),
    ("missing-column-suggests", [{"promt": "q", "completion": "a"}], SFT, 1, "prompt",
     "did you mean 'promt'? (rename it with data.columns.prompt=promt)"),
    ("missing-column-later-row", [GOOD, {"prompt": "q"}], SFT, 2, "completion", "missing column 'completion'"),
    ("null-value", [GOOD, {"prompt": "q", "completion": None}], SFT, 2, "completion", "is null: this row has no value"),
    ("prompt-wrong-type", [{"prompt": 42, "completion": "a"}], SFT, 1, "prompt", "got an integer"),
    ("empty-prompt", [{"prompt": "  ", "completion": "a"}], SFT, 1, "prompt", "empty prompt"),
    # JSON reads an unpaired "\ud800" escape into a string that has no UTF-8 form: Arrow failed in `datasets`.
    ("lone-surrogate", [GOOD, '{"prompt": "What is 1+2? \\ud800x", "completion": "3"}'], SFT, 2, "prompt",
     "not valid Unicode text: surrogates not allowed ('\\ud800' at character 13"),
    ("lone-surrogate-in-messages", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                      "content": "\udc00"}]}],
     SFT, 1, "messages", "not valid Unicode text"),
    ("empty-completion", [GOOD, {"prompt": "q", "completion": ""}], SFT, 2, "completion", "empty completion"),
    ("whitespace-completion", [{"prompt": "q", "completion": " \n "}], SFT, 1, "completion", "empty completion"),
    ("chosen-equals-rejected", [PAIR, PAIR | {"rejected": "5"}], RM, 2, "rejected", "identical"),
    ("margin-wrong-type", [PAIR | {"margin": "big"}], RM, 1, "margin", "must be a number"),
    ("nan-margin", ['{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}'], RM, 1, "margin",
     "finite"),
    ("ranking-one-response", [{"prompt": "q", "responses": ["a"]}], RM, 1, "responses", "at least 2"),
    ("ranking-scores-mismatch", [{"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0]}], RM, 1,
     "scores", "2 scores for 3 responses"),
    ("ranking-nan-score", ['{"prompt": "q", "responses": ["a", "b"], "scores": [1, NaN]}'], RM, 1, "scores[1]",
     "finite"),
    ("ranking-all-tied", [{"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.5, 0.5, 0.5]}], RM, 1,
     "scores", "all 3 responses have the same score (0.5)"),
    ("ranking-duplicate", [{"prompt": "q", "responses": ["5", "6", "5"]}], RM, 1, "responses",
     "responses[0] and responses[2] are identical: a ranking cannot put a response above itself"),
    ("ranking-duplicate-scored-apart", [{"prompt": "q", "responses": ["5", "6", "5", "6"], "scores": [3, 1, 3, 2]}],
     RM, 1, "scores", "responses[1] and responses[3] are identical but scored 1 and 2"),
    ("unknown-role", [{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}], SFT, 1,
     "messages[1].role", "unknown role 'robot'"),
    ("no-assistant-turn", [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}],
     SFT, 1, "messages", "no assistant turn"),
    ("message-without-content", [{"messages": [{"role": "user", "text": "q"}]}], SFT, 1, "messages[0].content",
     "did you mean 'text'"),
    ("content-not-text", [{"messages": [{"role": "user", "content": ["q"]}]}], SFT, 1, "messages[0].content",
     "content must be text"),
    ("think-never-closed", [{"prompt": "q", "completion": "<think>so 5"}], SFT, 1, "completion", "never closed"),
    ("think-and-reasoning", [{"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": "<think>a</think>5", "reasoning": "b"}]}], SFT, 1,
     "messages[1].content", "give the chain of thought once"),
    ("answer-only-thinking", [{"prompt": "q", "completion": "<think>5</think>"}], SFT, 1, "completion",
     "empty answer after the thinking block"),
    ("stepwise-labels-mismatch", [{"prompt": "q", "completions": ["1+1=2", "2+1=3"], "labels": [True]}],
     ("stepwise",), 1, "labels", "1 labels for 2 steps"),
    ("stepwise-label-type", [{"prompt": "q", "completions": ["1+1=2"], "labels": ["yes"]}], ("stepwise",), 1,
     "labels[0]", "must be a number"),
    ("verifiable-empty-answer", [{"prompt": "q", "answer": " "}], ("verifiable",), 1, "answer", "empty"),
    ("verifiable-steps-type", [{"prompt": "q", "answer": "3", "steps": "1,2"}], ("verifiable",), 1, "steps",
     "per-step gold values"),
]


@pytest.mark.parametrize(("rows", "accepts", "line", "field", "words"), [c[1:] for c in JSONL_CASES],
                         ids=[c[0] for c in JSONL_CASES])
def test_bad_jsonl_row(tmp_path, rows, accepts, line, field, words):
    path = _jsonl(tmp_path, *rows)
    err = _raises(_cfg(tmp_path, path), accepts)
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert words in err.message


def test_missing_file(tmp_path):
    err = _raises(_cfg(tmp_path, tmp_path / "nope.jsonl"))
    assert err.file == str(tmp_path / "nope.jsonl") and "file not found" in err.message


def test_missing_file_that_looks_like_a_task_name(tmp_path):
    err = _raises(_cfg(tmp_path, "arth"))
    assert "did you mean the built-in task 'arith'" in err.message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert "empty file" in _raises(_cfg(tmp_path, path)).message


def test_file_of_blank_lines_is_empty(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n")
    assert "empty file" in _raises(_cfg(tmp_path, path)).message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    err = _raises(_cfg(tmp_path, path))
    assert err.line == 2 and "not valid UTF-8: byte 0xe9" in err.message


def test_non_utf8_bytes_in_csv(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,completion\nq,a\nq,caf\xe9\n")
    err = _raises(_cfg(tmp_path, path))
    assert (err.line, err.file) == (3, str(path)) and "UTF-8" in err.message


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    assert "unsupported file type '.txt'" in _raises(_cfg(tmp_path, path)).message


def test_json_file_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [GOOD]}))
    err = _raises(_cfg(tmp_path, path))
    assert err.line == 1 and "list of rows" in err.message
    # One row alone on one line: the message said "(or one row per line), got dict" of a file that was that.
    path.write_text(json.dumps(GOOD))
    message = _raises(_cfg(tmp_path, path)).message
    assert "this one is a single object: put its rows in a list, or name it .jsonl" in message


def test_invalid_json_file_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "q", "completion": "a"},\n  {"prompt": "q" "completion": "a"}\n]\n')
    err = _raises(_cfg(tmp_path, path))
    assert err.line == 3 and "invalid JSON" in err.message


def test_json_list_items_keep_their_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "q", "completion": "a"},\n\n  {"prompt": "q",\n   "completion": ""}\n]\n')
    err = _raises(_cfg(tmp_path, path))
    assert (err.line, err.field) == (4, "completion")


def test_csv_cell_that_should_be_a_list(tmp_path):
    path = tmp_path / "rank.csv"
    path.write_text('prompt,responses\nq,"[""a"", ""b""]"\nq,a and b\n')
    err = _raises(_cfg(tmp_path, path), RM)
    assert (err.line, err.field) == (3, "responses") and "expected JSON" in err.message


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\nq,a\nq,a,b\n")
    err = _raises(_cfg(tmp_path, path))
    assert err.line == 3 and "more cells than the header" in err.message


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    assert "not a readable parquet file" in _raises(_cfg(tmp_path, path)).message


def test_datasets_directory_without_the_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    err = _raises(_cfg(tmp_path, tmp_path / "dd"))
    assert err.field == "data.split" and "has test" in err.message


def test_rename_of_a_column_that_is_not_there(tmp_path):
    path = _jsonl(tmp_path, GOOD)
    err = _raises(_cfg(tmp_path, path, columns=ColumnsConfig(prompt="question")))
    assert (err.line, err.field) == (1, "columns.prompt") and "'question'" in err.message


def test_python_rows_name_the_row(tmp_path):
    err = _raises(_cfg(tmp_path, "unused"), rows=[GOOD, "not a dict"])
    assert (err.file, err.line) == ("<rows>", 2)


def test_format_the_stage_does_not_take(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_rows(_cfg(tmp_path, "arith", format="preference"), SFT)
    assert info.value.field == "data.format"


def test_task_without_that_format(tmp_path):
    err = _raises(_cfg(tmp_path, "arith", format="stepwise"), ("stepwise",))
    assert err.field == "format" and "task 'arith' yields" in err.message


def test_prompt_longer_than_max_length_under_error_policy(tmp_path, tokenizer):
    long_prompt = "What is 12+34? 46\n" * 20 + "What is 1+1?"
    path = _jsonl(tmp_path, GOOD, {"prompt": long_prompt, "completion": "2"})
    cfg = _cfg(tmp_path, path, max_length=64, truncation="error")
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tokenizer, SFT)
    assert (info.value.line, info.value.field) == (2, "prompt") and "data.max_length=64" in info.value.message
    # A row held in one column names that column (it named a `completion` the row does not have).
    for row, field in (({"text": long_prompt}, "text"),
                       ({"messages": [{"role": "user", "content": long_prompt},
                                      {"role": "assistant", "content": "2"}]}, "messages")):
        path = _jsonl(tmp_path, row, name=f"{field}.jsonl")
        with pytest.raises(DataError) as info:
            prepare_data(_cfg(tmp_path, path, max_length=64, truncation="error"), tokenizer, SFT)
        assert (info.value.line, info.value.field) == (1, field)


def test_special_token_text_inside_a_message(tmp_path, tokenizer):
    path = _jsonl(tmp_path, GOOD, {"prompt": "q", "completion": "5<|end|> and more"})
    with pytest.raises(DataError) as info:
        prepare_data(_cfg(tmp_path, path), tokenizer, SFT)
    assert (info.value.line, info.value.field) == (2, "messages[1].content") and "'<|end|>'" in info.value.message


def test_template_that_does_not_render_prompts_as_prefixes(tmp_path, tokenizer):
    """Qwen-style templates drop the reasoning of every turn but the last: the tokens of a prompt
    that ends at an earlier turn are then not a prefix of the whole conversation's."""
    no_markers = copy.deepcopy(tokenizer)
    no_markers.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and m.get('reasoning') and loop.last %}<think>{{ m['reasoning'] }}</think>"
        "{% endif %}{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5", "reasoning": "2+3"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "5"}]
    with pytest.raises(DataError) as info:
        prepare_data(_cfg(tmp_path, "unused"), no_markers, SFT, rows=[{"messages": messages}])
    assert info.value.field == "messages[1]" and "not a prefix" in info.value.message


def test_nothing_left_to_train_on(tmp_path, tokenizer):
    path = _jsonl(tmp_path, {"prompt": "What is 1+1? " * 30, "completion": "2"})
    with pytest.raises(DataError) as info:
        prepare_data(_cfg(tmp_path, path, max_length=16), tokenizer, SFT)
    assert "no row is left to use: 1 of 1" in info.value.message


def test_a_stage_that_imitates_refuses_completions_labelled_undesirable(tmp_path):
    # KTO's unpaired rows read as prompt-completion rows too: SFT would train towards the completion to avoid.
    good, bad = GOOD | {"label": True}, {"prompt": "What is 2+2?", "completion": "5", "label": False}
    path = _jsonl(tmp_path, good, bad)
    error = _raises(_cfg(tmp_path, path), imitates=True)
    assert (error.file, error.line, error.field) == (str(path), 2, "label")
    assert "is False: an unpaired row" in str(error) and "posttrain kto" in str(error)
    numeric = _jsonl(tmp_path, good, GOOD | {"label": 1}, GOOD | {"label": 0}, name="numeric.jsonl")
    assert _raises(_cfg(tmp_path, numeric), imitates=True).line == 3
    with pytest.raises(DataError, match="is False") as info:  # rows handed in memory: the same rule
        load_rows(_cfg(tmp_path, ""), SFT, rows=[good, bad], imitates=True)
    assert (info.value.file, info.value.line) == ("<rows>", 2)
    # Rows all labelled desirable train; a stage that does not imitate (offline RFT grades completions) reads them.
    assert len(load_rows(_cfg(tmp_path, _jsonl(tmp_path, good, good, name="good.jsonl")), SFT, imitates=True)
               .dataset) == 2
    assert load_rows(_cfg(tmp_path, path), ("completion",)).format == "completion"
    # The same file read first without the check leaves no cached rows that skip it.
    assert _raises(_cfg(tmp_path, path), imitates=True).line == 2
