"""Every kind of source loads into the same canonical rows; renames; the Arrow cache."""

from __future__ import annotations

import codecs
import dataclasses
import json
import os

import pytest
from datasets import Dataset

from posttrain.config import load_config
from posttrain.data import ColumnsConfig, DataConfig, load_rows
from posttrain.data.schemas import message
from posttrain.errors import ConfigError, DataError

ROWS = [{"question": "What is 2+3?", "completion": "5", "id": 1},
        {"question": "What is 4*4?", "completion": "16", "id": 2}]
EXPECTED = [{"prompt": [message("user", r["question"])], "completion": [message("assistant", r["completion"])],
             "tools": None, "line": line} for r, line in zip(ROWS, (1, 2), strict=True)]


def _write(tmp_path, kind: str):
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ROWS) + "\n]\n")  # items on lines 2, 3
    elif kind == "csv":
        path.write_text("question,completion,id\n" + "".join(f"{r['question']},{r['completion']},1\n" for r in ROWS))
    elif kind == "parquet":
        Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_file_sources_with_a_column_rename(tmp_path, kind):
    path = _write(tmp_path, kind)
    cfg = load_config(DataConfig, None, [f"source={path}", "columns.prompt=question", f"cache_dir={tmp_path}/c"])
    rows = load_rows(cfg, ("messages", "completion"))
    assert rows.format == "completion" and rows.name == str(path)
    # Text files give lines (after the CSV header, after the JSON list's `[`), the others 1-based rows.
    expected = [r | {"line": r["line"] + 1} for r in EXPECTED] if kind in ("csv", "json") else EXPECTED
    assert rows.dataset[:] == {k: [r[k] for r in expected] for k in expected[0]}


def test_a_built_in_tasks_split_is_train_or_heldout():
    with pytest.raises(ConfigError, match="data.split: a built-in task's split is one of train, heldout, not 'test'"):
        load_rows(DataConfig(source="sort", split="test", size=5))  # a traceback from inside the task once


def test_python_rows(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    rows = [{"prompt": r["question"], "completion": r["completion"]} for r in ROWS]
    assert load_rows(cfg, ("completion",), rows=iter(rows)).dataset.to_list() == EXPECTED


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n" + json.dumps({"prompt": "q", "completion": "a"}) + "\n\n" + json.dumps(
        {"prompt": "q2", "completion": "b"}) + "\n")
    rows = load_rows(DataConfig(source=str(path), cache_dir=str(tmp_path)), ("completion",))
    assert rows.dataset["line"] == [2, 4]


def test_formats_are_detected_from_the_columns(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert load_rows(cfg, ("preference", "ranking"), rows=[pair]).format == "preference"
    ranking = {"prompt": "q", "responses": ["a", "b"]}
    assert load_rows(cfg, ("preference", "ranking"), rows=[ranking]).format == "ranking"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert load_rows(cfg, ("messages", "completion"), rows=[chat]).format == "messages"


def test_preference_rows_accept_strings_or_messages_and_a_margin(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
           "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b", "margin": 2}
    loaded = load_rows(cfg, ("preference",), rows=[row]).dataset[0]
    assert loaded["prompt"] == [message("system", "Be brief."), message("user", "q")]
    assert loaded["rejected"] == [message("assistant", "b")] and loaded["margin"] == 2.0


def test_ranking_with_scores_is_stored_best_first(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    row = {"prompt": "q", "responses": ["ok", "best", "bad"], "scores": [0.5, 0.9, -1]}
    loaded = load_rows(cfg, ("ranking",), rows=[row]).dataset[0]
    assert [r[0]["content"] for r in loaded["responses"]] == ["best", "ok", "bad"]
    assert loaded["scores"] == [0.9, 0.5, -1.0]


def test_ranking_with_tied_scores_is_stored_best_first_and_collated_with_tie_levels(tmp_path):
    """UltraFeedback-style ratings tie often: the tied responses share a level (what the losses and the
    accuracy read), in the order the row gave them."""
    from posttrain.data.collate import collate_rankings

    cfg = DataConfig(cache_dir=str(tmp_path))
    row = {"prompt": "q", "responses": ["c1", "a1", "c2", "a2", "d"], "scores": [3, 5, 3, 5, 1]}
    loaded = load_rows(cfg, ("ranking",), rows=[row]).dataset[0]
    assert [r[0]["content"] for r in loaded["responses"]] == ["a1", "a2", "c1", "c2", "d"]
    assert loaded["scores"] == [5.0, 5.0, 3.0, 3.0, 1.0]
    ids = [[1, 2]] * 5
    batch = collate_rankings([{"ranked_input_ids": ids, "ranked_response_mask": ids, "scores": loaded["scores"]},
                              {"ranked_input_ids": ids[:3], "ranked_response_mask": ids[:3], "scores": None}], 0)
    assert batch["levels"].tolist() == [0, 0, 1, 1, 2, 0, 1, 2]
    assert batch["ranks"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_csv_cells_hold_json_lists(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text('prompt,completions,labels\nq,"[""1+1=2"", ""2+2=5""]","[true, false]"\n')
    loaded = load_rows(DataConfig(source=str(path), cache_dir=str(tmp_path)), ("stepwise",)).dataset[0]
    assert loaded["completions"] == ["1+1=2", "2+2=5"] and loaded["labels"] == [1.0, 0.0]


def test_csv_as_spreadsheets_and_pandas_write_it(tmp_path):
    """A renamed structured column is read as JSON like one named so; TRUE/True/false labels; a byte-order mark
    (Excel's "CSV UTF-8"); each row at the line where its record starts, a quoted cell holding line breaks."""
    path = tmp_path / "sheet.csv"
    path.write_bytes(codecs.BOM_UTF8 + b'question,answer_steps,ok\nq1,"[""1+1=2""]",TRUE\n'
                     b'"a question\non three\nlines",2+2=4,False\nq3,3,true\n')
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path), columns=ColumnsConfig(
        prompt="question", completion="answer_steps", label="ok"))
    rows = load_rows(cfg, ("unpaired",)).dataset
    assert rows["label"] == [True, False, True] and rows["line"] == [2, 3, 6]
    assert rows[1]["prompt"][0]["content"] == "a question\non three\nlines"
    steps = tmp_path / "steps.csv"
    steps.write_text('prompt,my_steps,my_labels\nq,"[""1+1=2"", ""2+2=5""]","[true, false]"\n')
    cfg = DataConfig(source=str(steps), cache_dir=str(tmp_path), columns=ColumnsConfig(completions="my_steps",
                                                                                       labels="my_labels"))
    loaded = load_rows(cfg, ("stepwise",)).dataset[0]
    assert loaded["completions"] == ["1+1=2", "2+2=5"] and loaded["labels"] == [1.0, 0.0]


def test_a_csv_conversation_cell_is_read_as_messages_and_other_text_stays_text(tmp_path):
    """A `prompt` or `chosen` cell holding JSON messages (as `messages` cells do) was trained as its literal text."""
    path = tmp_path / "pairs.csv"
    turns = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    path.write_text("prompt,chosen,rejected\n" + ",".join('"' + c.replace('"', '""') + '"' for c in (
        turns, json.dumps([{"role": "assistant", "content": "hello"}]), '[{"a": 1}] is not a conversation')) + "\n")
    row = load_rows(DataConfig(source=str(path), cache_dir=str(tmp_path / "c")), ("preference",)).dataset[0]
    assert row["prompt"] == [message("system", "Be brief."), message("user", "hi")]
    assert row["chosen"] == [message("assistant", "hello")]
    assert row["rejected"] == [message("assistant", '[{"a": 1}] is not a conversation')]


def test_a_later_row_without_a_renamed_column_names_that_column(tmp_path):
    """Renames were checked on the first row only: row 2 without `question` was reported as lacking `prompt`,
    with a hint to rename `completion`."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "completion": "a"}) + "\n" + json.dumps({"q": "q", "completion": "a"})
                    + "\n")
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "c"), columns=ColumnsConfig(prompt="question"))
    with pytest.raises(DataError, match="column 'question' \\(to use as 'prompt'\\) is not in this row") as err:
        load_rows(cfg, ("completion",))
    assert (err.value.line, err.value.field) == (2, "columns.prompt")
    # An optional column may be missing from some rows, renamed or not.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "gap": 2.0}) + "\n"
                     + json.dumps({"prompt": "q", "chosen": "c", "rejected": "d"}) + "\n")
    cfg = DataConfig(source=str(pairs), cache_dir=str(tmp_path / "c"), columns=ColumnsConfig(margin="gap"))
    assert load_rows(cfg, ("preference",)).dataset["margin"] == [2.0, None]


def test_the_text_column_can_be_renamed(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), columns=ColumnsConfig(text="content"))
    assert load_rows(cfg, ("text",), rows=[{"content": "Once upon a time."}]).dataset["text"] == ["Once upon a time."]


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, kind):
    path = _write(tmp_path, kind)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    cfg = load_config(DataConfig, None, [f"source={path}", "columns.prompt=question", f"cache_dir={tmp_path}/c"])
    assert load_rows(cfg, ("completion",)).dataset["line"] == ([1, 2] if kind == "jsonl" else [2, 3])


def test_the_arrow_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path):
    path = _write(tmp_path, "jsonl")
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), columns=ColumnsConfig(prompt="question"))
    first = load_rows(cfg, ("completion",)).dataset
    second = load_rows(cfg, ("completion",)).dataset
    assert first.cache_files and first.cache_files == second.cache_files
    path.write_text(json.dumps({"question": "What is 1+1?", "completion": "2"}) + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse filesystem clocks
    third = load_rows(cfg, ("completion",)).dataset
    assert third.cache_files != first.cache_files and third["completion"] == [[message("assistant", "2")]]


def test_settings_of_built_in_tasks_do_not_key_a_files_cache(tmp_path, tokenizer):
    """data.size and data.seed (a task's rows) were in a file's cache key: the same file was read and tokenised
    again by each recipe of another data.size (sft 20000, rm 32000, dpo 6400) and for each data.seed (7.5 minutes
    for 1M rows)."""
    import dataclasses

    from posttrain.data.tokenize import tokenize_rows

    cfg = DataConfig(source=str(_write(tmp_path, "jsonl")), cache_dir=str(tmp_path / "cache"),
                     columns=ColumnsConfig(prompt="question"))
    first = load_rows(cfg, ("completion",))
    tokenised = tokenize_rows(first, tokenizer, cfg).dataset.cache_files
    for other in (dataclasses.replace(cfg, size=32000), dataclasses.replace(cfg, seed=5),
                  dataclasses.replace(cfg, split="heldout")):
        again = load_rows(other, ("completion",))
        assert again.dataset.cache_files == first.dataset.cache_files
        assert tokenize_rows(again, tokenizer, other).dataset.cache_files == tokenised
    task = DataConfig(source="arith", size=8, cache_dir=str(tmp_path / "cache"))  # a task's rows they choose
    assert load_rows(task, ("completion",)).dataset.cache_files != load_rows(
        dataclasses.replace(task, seed=5), ("completion",)).dataset.cache_files


def test_new_contents_of_the_same_size_and_mtime_and_a_same_named_file_elsewhere_miss_the_cache(tmp_path,
                                                                                              monkeypatch):
    """The key was the path as given, the size and the mtime: `cp -p`, `rsync -t` or `tar x` of new rows of the same
    size were served the old rows, and so was `data.source=data.jsonl` run from another directory."""
    rows = {"four": {"question": "What is 2+2?", "completion": "four"},
            "five": {"question": "What is 2+3?", "completion": "five"}}
    for name, row in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.jsonl").write_text(json.dumps(row) + "\n")
        os.utime(tmp_path / name / "data.jsonl", ns=(10**18, 10**18))
    cfg = DataConfig(source="data.jsonl", cache_dir=str(tmp_path / "cache"), columns=ColumnsConfig(prompt="question"))
    monkeypatch.chdir(tmp_path / "four")
    assert load_rows(cfg, ("completion",)).dataset["completion"] == [[message("assistant", "four")]]
    monkeypatch.chdir(tmp_path / "five")  # the same name, size and mtime: another file
    assert load_rows(cfg, ("completion",)).dataset["completion"] == [[message("assistant", "five")]]
    path = tmp_path / "five" / "data.jsonl"  # rewritten in place, its mtime set back
    path.write_text(json.dumps({"question": "What is 2+3?", "completion": "FIVE"}) + "\n")
    os.utime(path, ns=(10**18, 10**18))
    assert load_rows(cfg, ("completion",)).dataset["completion"] == [[message("assistant", "FIVE")]]


def test_tokenised_rows_are_cached_under_the_tokenising_codes_digest_too(tmp_path, monkeypatch, tokenizer):
    """datasets keys the map on the encoder's settings, not on posttrain's code: an upgrade that changed the masks
    was served the old ones."""
    import posttrain.data.tokenize as tokenize
    from posttrain.data.sources import code_digest

    module = tmp_path / "module.py"
    module.write_text("x = 1\n")
    before = code_digest(str(module))
    module.write_text("x = 2\n")
    assert code_digest(str(module)) != before
    cfg = DataConfig(source="arith", size=8, cache_dir=str(tmp_path / "cache"))
    first = tokenize.tokenize_rows(load_rows(cfg, ("completion",)), tokenizer, cfg).dataset.cache_files
    assert tokenize.tokenize_rows(load_rows(cfg, ("completion",)), tokenizer, cfg).dataset.cache_files == first
    monkeypatch.setattr(tokenize, "_CODE", "another version")
    assert tokenize.tokenize_rows(load_rows(cfg, ("completion",)), tokenizer, cfg).dataset.cache_files != first


def test_a_task_whose_rows_changed_is_not_served_from_the_cache(tmp_path, monkeypatch):
    from posttrain.data.tasks import get_task

    cfg = DataConfig(source="chain", size=8, cache_dir=str(tmp_path / "cache"))
    first = load_rows(cfg, ("verifiable",)).dataset
    assert load_rows(cfg, ("verifiable",)).dataset.cache_files == first.cache_files  # reused while unchanged
    task = get_task("chain")
    rows = task.rows

    def reworded(fmt, split="train", size=1000, seed=0):  # the same task, a new prompt wording
        return ({**row, "prompt": "Compute " + row["prompt"]} for row in rows(fmt, split, size, seed))

    monkeypatch.setattr(task, "rows", reworded)
    again = load_rows(cfg, ("verifiable",)).dataset
    assert again.cache_files != first.cache_files
    assert again[0]["prompt"][0]["content"].startswith("Compute What is")


def test_limit(tmp_path):
    path = _write(tmp_path, "jsonl")
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path), limit=1, columns=ColumnsConfig(prompt="question"))
    assert len(load_rows(cfg, ("completion",)).dataset) == 1


def test_a_task_whose_settings_changed_is_not_served_from_the_cache(tmp_path, monkeypatch):
    """A task setting that only some rows show (chain's share of worked answers) must not reuse the old rows, even
    when the first rows of the fingerprint come out the same."""
    from posttrain.data.tasks import get_task

    cfg = DataConfig(source="chain", size=64, cache_dir=str(tmp_path / "cache"))
    task = get_task("chain")
    first = load_rows(cfg, ("completion",)).dataset
    before = list(task.rows("completion", "train", size=4, seed=cfg.seed))
    monkeypatch.setattr(task, "worked_share", task.worked_share + 0.001)
    assert list(task.rows("completion", "train", size=4, seed=cfg.seed)) == before  # the same first rows
    again = load_rows(cfg, ("completion",)).dataset
    assert again.cache_files != first.cache_files


def test_numeric_gold_answers_are_stored_as_they_would_be_written(tmp_path):
    """5.0 (a float column: pandas' integers with a missing value, a JSON writer) is the answer 5, which the
    task's extraction of "5" from a completion must equal; 2.5 stays 2.5."""
    rows = [{"prompt": "What is 2+3?", "answer": 5.0}, {"prompt": "What is 5/2?", "answer": 2.5},
            {"prompt": "What is 2-9?", "answer": -7}, {"prompt": "Say hi", "answer": " hi "}]
    loaded = load_rows(DataConfig(cache_dir=str(tmp_path)), ("verifiable",), rows=rows).dataset
    assert loaded["answer"] == ["5", "2.5", "-7", "hi"]


def test_a_cache_directory_that_cannot_be_used_is_one_line_naming_the_setting(tmp_path):
    """A file, or a directory under one (where root's tests cannot make one read-only): datasets' traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = _write(tmp_path, "jsonl")
    for cache in (blocker, blocker / "cache"):
        cfg = DataConfig(source=str(path), cache_dir=str(cache), columns=ColumnsConfig(prompt="question"))
        with pytest.raises(ConfigError, match=rf"data.cache_dir: the data cache {cache} cannot be used \(.*\): set "
                                              "data.cache_dir to a writable directory"):
            load_rows(cfg, ("completion",))


def test_one_column_renamed_to_two_names_is_refused():
    """One of the two was silently lost: `columns.prompt=q columns.answer=q` read no prompt."""
    with pytest.raises(ConfigError, match="data.columns.answer: the column 'q' is renamed to both prompt and answer"):
        load_config(DataConfig, None, ["columns.prompt=q", "columns.answer=q"])
    assert ColumnsConfig(prompt="q", answer="a").renames() == {"q": "prompt", "a": "answer"}


def test_a_datasets_directory_without_the_split_names_how_to_read_the_one_it_has(tmp_path):
    """`posttrain eval --data` has no split option: the error named a setting it cannot take. Each split is a
    directory of its own, which reads as a source."""
    from datasets import DatasetDict

    path = tmp_path / "dd"
    DatasetDict({"test": Dataset.from_list(ROWS)}).save_to_disk(str(path))
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "c"), columns=ColumnsConfig(prompt="question"))
    with pytest.raises(DataError, match=rf"data.split: no split 'train'; the directory has test: choose one with "
                                        rf"data.split, or name its own directory \({path / 'test'}\)"):
        load_rows(cfg, ("completion",))
    assert len(load_rows(dataclasses.replace(cfg, source=str(path / "test")), ("completion",)).dataset) == 2


def test_a_jsonl_file_whose_lines_end_with_cr_alone_says_so(tmp_path):
    """It said "invalid JSON: Extra data" and nothing of why."""
    path = tmp_path / "cr.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\r{"prompt": "c", "completion": "d"}\r')
    with pytest.raises(DataError, match=r"cr.jsonl:1: invalid JSON: Extra data \(column 36\): its lines end with CR "
                                        r"alone; convert them to LF"):
        list(load_rows(DataConfig(source=str(path), cache_dir=str(tmp_path / "c")), ("completion",)).dataset)


@pytest.mark.parametrize(("fmt", "make"), [
    ("ranking", lambda i: {"prompt": f"q{i % 4}", "responses": [f"r{i % 3}", "x"], "scores": [1, 0]}),
    ("messages", lambda i: {"messages": [{"role": "user", "content": f"q{i % 5}"},
                                         {"role": "assistant", "content": f"a{i % 2}"}]}),
    ("verifiable", lambda i: {"prompt": f"What is {i % 6}?", "answer": str(i % 6),
                              **({"steps": ["1"]} if i % 2 else {})}),
    ("preference", lambda i: {"prompt": "p", "chosen": f"c{i}", "rejected": "r"}),  # no repeats at all
])
def test_held_out_rows_repeated_among_the_trained_ones_are_counted_and_warned_of(fmt, make, caplog):
    """A file with repeated rows split at random held out copies of trained rows, without a word (every held-out
    ranking of one user's file had a trained copy: eval_accuracy 1.0). Counted against a plain loop over the rows."""
    from posttrain.data.pipeline import split_rows, warn_of_repeats

    rows = load_rows(DataConfig(), (fmt,), rows=[make(i) for i in range(30)])
    trained, held_out = split_rows(rows, 0.3, seed=1)

    def contents(part):
        return [{k: v for k, v in row.items() if k != "line"} for row in part.dataset]

    expected = sum(row in contents(trained) for row in contents(held_out))
    assert (expected > 0) == (fmt != "preference")
    assert warn_of_repeats(trained, held_out) == expected
    assert (f"{expected} of the 9 held-out rows (data.eval_split) are also among the trained rows" in caplog.text) \
        == (expected > 0)


def test_a_message_whose_content_is_null_is_told_so_not_to_rename_content_to_content():
    """It said "message has no 'content' — did you mean 'content'?"."""
    rows = [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match=r":1: messages\[0\]\.content: content is null \(only an assistant turn that "
                                        r"makes tool calls may have none\)$"):
        load_rows(DataConfig(), ("messages",), rows=rows)
    with pytest.raises(DataError, match=r"message has no 'content' — did you mean 'contents'\?"):
        load_rows(DataConfig(), ("messages",), rows=[{"messages": [{"role": "user", "contents": "hi"}]}])


def test_rows_that_differ_only_in_how_nested_lists_split_or_a_missing_list_are_not_repeats():
    """The row texts the repeat warning compares joined nested lists with one separator ([[1], [2, 3]] read as
    [[1, 2], [3]]) and a missing list as an empty one."""
    from datasets import Dataset

    from posttrain.data.pipeline import _row_texts
    from posttrain.data.sources import Rows

    rows = Rows(dataset=Dataset.from_list([{"x": [["1"], ["2", "3"]], "y": ["a"]},
                                           {"x": [["1", "2"], ["3"]], "y": ["a"]},
                                           {"x": [["1"], ["2", "3"]], "y": None},
                                           {"x": [["1"], ["2", "3"]], "y": []},
                                           {"x": [["1"], ["2", "3"]], "y": ["a"]}]), format="x", name="rows")
    texts = _row_texts(rows).to_pylist()
    assert len(set(texts[:4])) == 4 and texts[4] == texts[0]
