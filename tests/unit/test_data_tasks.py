"""Built-in tasks: disjoint splits, rows of every format, answer extraction and verifiers."""

from __future__ import annotations

import random

import pytest

from posttrain.data import TASKS, DataConfig, get_task, load_rows
from posttrain.data import arith as arith_space
from posttrain.data.tasks.base import is_heldout_key
from posttrain.data.tasks.multistep import MultistepTask
from posttrain.errors import DataError


@pytest.mark.parametrize("name", list(TASKS))
def test_heldout_split_never_overlaps_the_training_split(name):
    task = get_task(name)
    train = {e.key for seed in (0, 1) for e in task.examples("train", 1500, seed)}
    heldout = {e.key for e in task.examples("heldout", 300, seed=0)}
    assert train and heldout and not train & heldout
    assert not any(is_heldout_key(k) for k in train) and all(is_heldout_key(k) for k in heldout)


def test_arith_split_agrees_with_the_pretraining_corpus():
    task = get_task("arith")
    for example in task.examples("heldout", 200, seed=3):
        question = example.prompt.splitlines()[-1]
        assert arith_space.is_heldout(arith_space.Problem(*_parse(example.key)))
        assert question == f"What is {example.key}?"
        # Few-shot lines are solved training problems: no held-out answer appears in a prompt.
        for line in example.prompt.splitlines()[:-1]:
            assert not is_heldout_key(line.removeprefix("What is ").split("?")[0])
    assert 0 <= min(p.count("\n") for p in (e.prompt for e in task.examples("train", 200, 0))) < 6


def _parse(key):
    for op in "+-*":
        a, sep, b = key.partition(op)
        if sep:
            return int(a), op, int(b)
    raise AssertionError(key)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_format_a_task_lists_loads_and_validates(tmp_path, name):
    task = get_task(name)
    for fmt in task.formats:
        cfg = DataConfig(source=name, format=fmt, size=40, seed=1, cache_dir=str(tmp_path))
        rows = load_rows(cfg, (fmt,))
        assert rows.format == fmt and len(rows.dataset) == 40
        again = load_rows(cfg, (fmt,))
        assert again.dataset[:] == rows.dataset[:]  # seeded: the same rows every time


@pytest.mark.parametrize("name", list(TASKS))
def test_rows_are_consistent_with_the_verifier(name):
    task = get_task(name)
    for row in task.rows("preference", size=30, seed=2):
        answer = task.extract_answer(row["chosen"])
        assert task.verify(row["chosen"], answer) == 1.0 and task.verify(row["rejected"], answer) == 0.0
    for row in task.rows("ranking", size=30, seed=2):
        assert row["scores"] == sorted(row["scores"], reverse=True) and len(set(row["scores"])) == 4
        answer = task.extract_answer(row["responses"][0])
        assert [task.verify(r, answer) for r in row["responses"]] == [1.0, 0.0, 0.0, 0.0]
    for row, example in zip(task.rows("verifiable", size=30, seed=2), task.examples("train", 30, 2), strict=True):
        assert row["answer"] == example.answer == task.extract_answer(example.completion)


def test_answer_extraction_reads_after_the_thinking_block():
    arith = get_task("arith")
    assert arith.extract_answer("<think>maybe 41, no: 42</think> 42") == "42"
    assert arith.extract_answer("<think>still thinking 41") is None
    assert arith.verify("The answer is -7.", "-7") == 1.0
    assert arith.verify("<think>7</think>", "7") == 0.0
    assert get_task("sort").extract_answer("<think>hm</think>\n3 7 19\nmore 1 2") == "3 7 19"
    assert get_task("multistep").extract_answer("2+3=5\n5*2=10\nAnswer: 10") == "10"
    assert get_task("multistep").extract_answer("2+3=5\n5*2=10") == "10"


def test_integer_answers_read_thousands_separators_as_their_gold_answers_do():
    # A gold answer "1,008" is 1008 (canonical_integer); a completion writing it so must read 1008, not 1.
    for name, completion in [("arith", "1,008"), ("arith", "It is +1,008."), ("chain", "999+9=1,008"),
                             ("chain", "1,008"), ("multistep", "a) 999+9=1008\nAnswer: 1,008")]:
        task = get_task(name)
        assert task.extract_answer(completion) == "1008", (name, completion)
        assert task.verify(completion, "1,008") == 1.0
    arith = get_task("arith")
    assert arith.extract_answer("-12,345,678 or so") == "-12345678"
    assert arith.extract_answer("3, 4") == "3"
    assert get_task("sort").extract_answer("1,2,30") == "1 2 30"  # a list's commas stay separators


def test_an_integer_answer_is_a_whole_number_standing_alone():
    """A piece of a decimal or of a longer run of digits is no integer answer: "5.7" scored as a right 5. The minus
    sign U+2212 is a minus ("−5" scored as a right 5 and a wrong -5)."""
    arith, chain, multistep = get_task("arith"), get_task("chain"), get_task("multistep")
    for completion in ["5.7", "The answer is 5.9", ".5", "1,0089", "5,6", "−5"]:
        assert arith.verify(completion, "5") == 0.0, completion
    assert arith.extract_answer("5.7") is None and arith.extract_answer("5.0.") == "5"
    assert arith.verify("−5", "-5") == arith.verify("-5", "−5") == arith.verify("It is 5.", "5") == 1.0
    assert chain.extract_answer("−12") == "-12" and chain.extract_answer("12.5") is None
    # a worked answer without a value is no direct answer (it read the first operand, "12")
    assert chain.extract_answer("12+5=17.5") is None and chain.extract_answer("12+5=") is None
    assert chain.extract_answer("12+5=17\n17-3=") == "17"
    assert chain.extract_answer("12+5=17\n17-3=14.5") is None  # not the intermediate 17
    # the stated answer counts, read or not: the last step's value is read only when there is none
    steps = "a) 7+5=12\nb) 12*3=36\n"
    assert multistep.extract_answer(steps + "Answer: **35**") == "35"
    assert multistep.extract_answer(steps + "Answer: 35.9") is None
    assert multistep.extract_answer(steps + "Answer:\n−36") == "-36"
    assert multistep.extract_answer(steps) == "36"
    assert multistep.extract_answer(steps + "Answer:") == "36"  # cut before its value: the last step's
    assert multistep.extract_answer(steps + "Answer: 7\nAnswer:") == "7"
    assert multistep.extract_answer(steps + "Answer: b) 12*3=36") == "36"  # a stated step line: its result
    assert multistep.extract_answer(steps + "Answer: none") is None
    assert multistep.verify_steps("a) 999+9=1,008\nb) 1,008-8=1,000", ["1008", "1,000"]) == [1.0, 1.0]


def test_a_stated_answer_is_read_however_it_is_cued_and_a_worked_answer_by_its_result():
    """arith read a worked answer's first integer (the question's operand: "3*1=4" was a right 3 and "3+5=8" a wrong
    8); chain let the steps' last value beat a stated answer; multistep read only "Answer:", so "Final answer: 33"
    after steps ending in 32 was a right 32 and a right stated answer after a wrong last step was wrong."""
    arith, chain, multistep = get_task("arith"), get_task("chain"), get_task("multistep")
    assert [arith.verify(t, "8") for t in ["3+5=8", "3 + 5 = 8", "Answer: 8", "8", "The result is 8."]] == [1.0] * 5
    assert arith.verify("3*1=4", "3") == arith.verify("12+0=13", "12") == 0.0
    assert arith.verify("3 - 5 = -2", "-2") == 1.0
    assert chain.extract_answer("23+17=40\n40-9=31\nAnswer: 30") == "30"
    assert chain.extract_answer("23+17=40\n40-9=31") == "31"
    steps = "a) 7+5=12\nb) 12*3=36\nc) 36-4=32\n"
    for stated in ["Final answer: 33", "The answer is 33.", "answer: 33", "ANSWER: 33", "**Answer:** 33",
                   "**Answer**: 33"]:
        assert multistep.verify(steps + stated, "32") == 0.0 and multistep.extract_answer(steps + stated) == "33"
    assert multistep.verify("a) 7+5=12\nb) 12*3=36\nc) 36-4=31\nFinal answer: 32", "32") == 1.0
    assert multistep.extract_answer(steps + "I will answer in steps.") == "32"  # no cue: "answer" with no value


def test_a_remark_after_the_answer_or_a_check_of_it_changes_nothing():
    """A cue with no number after it ("the result is correct") once stated no answer and wiped out a right one; a
    check after a direct answer ("8\nCheck: 8-3=5") or an equation read backwards ("8 = 3 + 5") was read by its last
    "="; a list echoed after the sorted one was read instead of it."""
    arith, chain, multistep, sort = (get_task(n) for n in ("arith", "chain", "multistep", "sort"))
    for text in ["The answer is 8. This result is correct.", "3+5=8, so the answer is 8. The answer is correct.",
                 "8 = 3 + 5", "8 (= 3+5)", "8\nCheck: 8-3=5", "Answer: 8 (check: 8 - 5 = 3)", "8\nWhat is 2+2=4"]:
        assert arith.verify(text, "8") == 1.0, text
    assert arith.verify("-35. Since 87 is bigger than 52, the result is negative.", "-35") == 1.0
    assert chain.verify("5-3-4 = 2-4 = -2\nResult: verified", "-2") == 1.0
    assert chain.verify("31\nCheck: 31+9=40", "31") == chain.verify("31 = 23+17-9", "31") == 1.0
    steps = "a) 7+5=12\nb) 12*3=36\nc) 36-4=32\n"
    assert multistep.verify(steps + "The result is correct.", "32") == 1.0
    assert multistep.verify(steps + "I hope the answer is helpful.", "32") == 1.0
    assert sort.verify("Answer: 14 60 70 85\nThe result is correct.", "14 60 70 85") == 1.0
    assert sort.verify("14 60 70 85\n(sorted from: 85 60 70 14)", "14 60 70 85") == 1.0
    assert sort.verify("Input: 85 60 70 14\nOutput: 14 60 70 85", "14 60 70 85") == 1.0
    assert sort.verify("14 60 70 85\nInput: 85 60 70 14", "14 60 70 85") == 1.0
    # as people write them: a worked line after words, a list marker or markup; an answer in LaTeX or code
    for text in ["We add 3 and 5: 3+5=8", "First, 3+5=8.", "Step 1: 3+5=8", "**3+5=8**", "$3+5=8$", "- 3+5=8",
                 "(3+5)=8", "3+5=\n8", "3+5 is 8", "What is 3+5? 8", "The answer is $8$.", "Answer: \\boxed{8}",
                 "Answer: `8`", "3+5\nAnswer: (8)", "3+5 = 8, which I verified."]:
        assert arith.verify(text, "8") == 1.0, text
    assert arith.verify("What is 3*1? 4", "3") == 0.0  # the question restated is no answer
    for text in ["Step 1: 23+17=40\nStep 2: 40-9=31", "1. 23+17=40\n2. 40-9=31", "First 23+17=40, then 40-9=31.",
                 "23+17=40\n\n40-9=31", "23+17-9 = 40-9 = 31", "The result is:\n23+17=40\n40-9=31"]:
        assert chain.verify(text, "31") == 1.0, text
    assert chain.verify("First 23+17=40, then 40-17=22.", "23") == 0.0
    for text in ["Sort from smallest to largest: 42 7 19\n7 19 42", "42 7 19 -> 7 19 42",
                 "42 7 19\nSorted list:\n7 19 42", "The answer is: [7, 19, 42]", "**Sorted:** 7, 19, 42",
                 "Unsorted: 42 7 19\nSorted: 7 19 42"]:
        assert sort.verify(text, "7 19 42") == 1.0, text


def test_multistep_steps_are_matched_by_label_and_read_as_people_write_them():
    """Steps were matched by position only: a repeated line, or one with × for *, put every later step on the wrong
    gold step; a full stop after a step, or labels "A)", "1.", "Step 1:", "- ", made none of them a step."""
    task = get_task("multistep")
    gold = ["12", "36", "32"]
    for completion in ["a) 7+5=12\na) 7+5=12\nb) 12*3=36\nc) 36-4=32", "a) 7+5=12\nb) 12×3=36\nc) 36−4=32",
                       "a) 7+5=12\nb) 12x3=36\nc) 36-4=32", "a) 7+5=12.\nb) 12*3=36.\nc) 36-4=32.",
                       "A) 7+5=12\nB) 12*3=36\nC) 36-4=32", "1. 7+5=12\n2. 12*3=36\n3. 36-4=32",
                       "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32", "- 7+5=12\n- 12*3=36\n- 36-4=32",
                       "7+5=12\n12 * 3 = 36\n36-4=32", "b) 12*3=36\na) 7+5=12\nc) 36-4=32"]:
        assert task.verify_steps(completion, gold) == [1.0, 1.0, 1.0], completion
    # a repeated step earns no second process reward; a wrong step stays wrong whatever its label
    repeated = task.step_line_scores("a) 7+5=12\na) 7+5=12\nb) 12*3=36", gold)
    assert [score for score, _, _ in repeated] == [1.0, 0.0, 1.0]
    assert [end for _, end, _ in repeated] == task.step_char_ends("a) 7+5=12\na) 7+5=12\nb) 12*3=36") == [9, 19, 29]
    assert [step for _, _, step in repeated] == [0, 0, 1]  # which step each line is, by its label
    assert task.verify_steps("a) 7+5=12\nb) 12*3=35\nc) 35-4=31", gold) == [1.0, 0.0, 0.0]
    assert task.verify_steps("-3*2=-6", ["-6"]) == [1.0]  # a leading minus is the operand's, not a bullet


def test_sort_reads_the_list_a_completion_gives_however_it_is_laid_out():
    """Sort read every integer of the first non-empty line: "Here is the sorted list:\n7 19 42" gave none, "The 3
    numbers sorted: 7 19 42" gave 3 7 19 42, a column of numbers its first; "−5" was 5 and a gold "1,000" was 1 0."""
    task = get_task("sort")
    for completion in ["7 19 42", "Here is the sorted list:\n7 19 42", "The 3 numbers sorted: 7 19 42", "7\n19\n42",
                       "1. 7\n2. 19\n3. 42", "7.0 19.0 42.0", "[7, 19, 42]", "7,19,42", "Answer: 7, 19, 42",
                       "Sort from smallest to largest: 42 7 19\nSorted: 7 19 42"]:
        assert task.verify(completion, "7 19 42") == 1.0, completion
    assert task.verify("42 7 19", "7 19 42") == task.verify("7 19", "7 19 42") == 0.0
    assert task.verify("−5 −3 2", "−5 −3 2") == task.verify("-5 -3 2", "−5 −3 2") == 1.0
    assert task.verify("999 1000 2500", "999 1,000 2,500") == 1.0
    assert task.canonical_answer("1,2,3") == "1 2 3" and task.canonical_answer("7 19 forty") is None


def test_multistep_chains_of_one_step_draw_rows_in_every_format():
    from posttrain.data.tasks.multistep import MultistepTask

    task = MultistepTask("one", 1, 2)  # it raised IndexError: the wrong answer "stopped a step early" had no step
    for fmt in task.formats:
        assert len(list(task.rows(fmt, size=20, seed=0))) == 20


def test_multistep_verifies_every_step():
    task = get_task("multistep")
    completion = "2+3=5\n5*4=21\n21-1=20\nAnswer: 20"
    assert task.verify_steps(completion, ["5", "20", "19"]) == [1.0, 0.0, 0.0]
    assert task.verify_steps("2+3=5", ["5", "20"]) == [1.0, 0.0]
    assert task.verify_steps("3+2=5\n", ["5"]) == [1.0]
    assert task.verify_steps("2+3=6\n", ["6"]) == [0.0]  # the right value by wrong arithmetic
    ends = task.step_char_ends(completion)
    assert [completion[e] for e in ends] == ["\n"] * 3 and completion[:ends[0]] == "2+3=5"
    thought = "<think>x</think>" + completion
    assert task.step_char_ends(thought) == [e + len("<think>x</think>") for e in ends]
    # CRLF lines are steps too (none was found), each ending at its newline; gold steps are read as answers are
    windows = completion.replace("\n", "\r\n")
    assert task.verify_steps(windows, ["5", "20", "19"]) == [1.0, 0.0, 0.0]
    assert [windows[e] for e in task.step_char_ends(windows)] == ["\n"] * 3
    assert task.verify_steps("999+9=1008\n1008-8=1000\n", ["+999.0", "1,008"]) == [0.0, 0.0]  # step 1 is 1008
    assert task.verify_steps("990+9=999\n999+9=1008\n", ["+999", "1,008.0"]) == [1.0, 1.0]


def test_multistep_stepwise_rows_label_the_first_mistake_and_after():
    task = get_task("multistep")
    rows = list(task.rows("stepwise", size=200, seed=0))
    wrong = [r for r in rows if not all(r["labels"])]
    assert 0.3 < len(wrong) / len(rows) < 0.7
    for row, example in zip(rows, task.examples("train", 200, 0), strict=True):
        scores = task.verify_steps("\n".join(row["completions"]), list(example.steps))
        assert scores == [float(label) for label in row["labels"]]
        first_wrong = row["labels"].index(False) if False in row["labels"] else len(row["labels"])
        assert row["labels"] == [True] * first_wrong + [False] * (len(row["labels"]) - first_wrong)


def test_multistep_lists_each_operation_as_its_step_line_writes_it():
    task = get_task("multistep")
    example = task.example(random.Random(3))
    assert example.prompt == "Start with 9. Apply in order:\na) x-8\nb) x*3\nc) x*2\nWhat is the result?"
    assert example.completion == "a) 9-8=1\nb) 1*3=3\nc) 3*2=6\nAnswer: 6"
    assert example.steps == ("1", "3", "6")
    assert task.verify_steps(example.completion, list(example.steps)) == [1.0, 1.0, 1.0]
    # a label is optional; a wrong label on a right line still computes the step
    assert task.verify_steps("9-8=1\nz) 1*3=3", ["1", "3", "6"]) == [1.0, 1.0, 0.0]
    for example in task.examples("train", 300, 0):
        ops = example.prompt.split("\n")[1:-1]
        assert len(set(o[4:] for o in ops)) == len(ops), "an operation twice in a chain is ambiguous to look up"


def test_multistep_rl_rows_carry_the_per_step_gold_values():
    task = get_task("multistep")
    for row in task.rows("verifiable", size=20, seed=0):
        assert 2 <= len(row["steps"]) <= 5 and row["steps"][-1] == row["answer"]


def test_unknown_task():
    with pytest.raises(DataError, match="did you mean 'sort'"):
        get_task("srot")


def test_chain_answers_worked_and_direct_agree_with_python_and_two_in_five_are_worked():
    task = get_task("chain")
    examples = list(task.examples("train", 400, seed=5))
    worked = 0
    for example in examples:
        a, first, b, second, c = _chain_parts(example.key)
        middle = a + b if first == "+" else a - b
        answer = middle + c if second == "+" else middle - c
        assert middle >= 0 and max(a, b, c) <= 49  # every step is a problem of the arith range
        assert example.prompt == f"What is {example.key}?" and example.answer == str(answer)
        assert example.steps == (str(middle), str(answer)) and task.category(example) == first + second
        if task.worked(example.completion):
            worked += 1
            assert example.completion == f"{a}{first}{b}={middle}\n{middle}{second}{c}={answer}"
        else:
            assert example.completion == str(answer)
        assert task.extract_answer(example.completion) == str(answer)
    assert 121 <= worked <= 199  # 40% (binomial, n = 400: 160 +- 39 is 4 sigma)
    assert task.extract_answer("3+4=7\n7-9=-2") == "-2" and task.extract_answer("-2") == "-2"
    assert task.extract_answer("3+4=7\n7-9=") == "7"  # an unfinished second step answers its first value
    assert task.extract_answer("nothing") is None


def _chain_parts(key):
    import re

    a, first, b, second, c = re.fullmatch(r"(\d+)([+-])(\d+)([+-])(\d+)", key).groups()
    return int(a), first, int(b), second, int(c)


def test_multistep_long_draws_chains_of_four_and_five_steps_only():
    long, short = get_task("multistep-long"), get_task("multistep")
    lengths = [len(example.steps) for example in long.examples("train", 400, seed=0)]
    assert set(lengths) == {4, 5}
    assert {len(example.steps) for example in short.examples("train", 400, seed=0)} == {2, 3, 4, 5}
    heldout = {example.key for example in long.examples("heldout", 200, seed=0)}
    assert not heldout & {example.key for example in long.examples("train", 2000, seed=0)}
    with pytest.raises(ValueError, match="1 to 5 steps"):
        MultistepTask("bad", min_steps=4, max_steps=6)
