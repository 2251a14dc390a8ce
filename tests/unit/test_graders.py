"""Graders against hand-computed scores; the python grader's sandbox; multi formulas; grader YAML errors."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from posttrain.data.schemas import message
from posttrain.errors import ConfigError
from posttrain.rewards import Completions, WeightedRewards
from posttrain.rewards.functions import grader_reward
from posttrain.rewards.graders import Formula, answer_line, boxed, build_grader, last_number, load_grader, regex


def grade(spec, outputs, items):
    return build_grader(spec).grade([{"output_text": o} for o in outputs], items)


# ---------------------------------------------------------------------------------------------- extraction


def test_answer_extraction():
    assert last_number("3 apples and 1,024 pears, so 7.5") == "7.5"
    assert last_number("no digits") == ""
    assert last_number("it is -12") == "-12"
    assert boxed(r"so \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert boxed(r"\boxed{unclosed") == ""
    assert answer_line("think\nAnswer: 42\nmore\nFinal answer: 43 ") == "43"
    assert answer_line("the answer is 5") == ""
    assert regex("x=3, x=4", r"x=(\d)") == "4"
    assert regex("abc", r"\d") == ""


def test_number_extraction_reads_whole_numbers_only():
    """A number is never a piece of a longer one: the minus sign U+2212 read "−5" as 5, "1.5e3" read 3, "1/2"
    read 2, ".5" read 5, "1,0000" read 0."""
    cases = {"the answer is −5": "-5", "1.5e3": "1.5e3", "1/2": "1/2", "so .5": ".5", "1,0000": "", "12,34": "",
             "$1,234.56.": "1234.56", "answer 7.": "7", "total +5": "5", "2024-01-15 gives 7": "7", "−1,024": "-1024"}
    assert {text: last_number(text) for text in cases} == cases
    # a group that took no part in the last match is "", not "None"
    assert regex(r"\boxed{7}", r"Answer: (\d+)|boxed\{(\d+)\}") == ""
    assert regex(r"\boxed{7}", r"Answer: (\d+)|boxed\{(\d+)\}", 2) == "7"


@pytest.mark.parametrize("answer, score", [("Score: -1", -1.0), ("Score (1-10): 7", 7.0),
                                           ("Rating (out of 10): 6", 6.0), ("Score: \u22122", -2.0),
                                           ("**Score:** 9.5", 9.5), ("Score: .8", 0.8), ("Grade = 3/10", 3.0)])
def test_judge_score_keeps_the_sign_and_skips_a_range_after_the_label(answer, score):
    from posttrain.rewards.graders.score_model import judge_score

    assert judge_score(answer, 10.0) == (score, None)


# ---------------------------------------------------------------------------------------------- string_check


@pytest.mark.parametrize("operation, expected", [("eq", [1, 0, 0]), ("ne", [0, 1, 1]), ("like", [1, 1, 0]),
                                                 ("ilike", [1, 1, 1])])
def test_string_check_operations(operation, expected):
    spec = {"type": "string_check", "operation": operation, "input": "{{ sample.output_text }}",
            "reference": "{{ item.answer }}"}
    result = grade(spec, ["Paris", "in Paris!", "PARIS"], [{"answer": "Paris"}] * 3)
    assert result.scores == [float(e) for e in expected]


def test_string_check_with_extraction_filter():
    spec = {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text | boxed }}",
            "reference": "{{ item.answer }}"}
    assert grade(spec, [r"so \boxed{12}", "12"], [{"answer": "12"}] * 2).scores == [1.0, 0.0]


def test_a_row_without_a_value_for_a_field_the_template_reads_is_an_error_of_its_own():
    """Printed, a prompt-only row's answer (None) was the text "None", and every such row failed the comparison
    without a word; through a filter it was a TypeError from inside the filter."""
    for reference in ("{{ item.answer }}", "{{ item.answer | last_number }}"):
        spec = {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}", "reference": reference}
        with pytest.raises(ValueError, match=r"has no value in this row \(None\)"):
            grade(spec, ["None"], [{"answer": None}])
        # As a run's reward: that row's error (scored 0, kept with the others), the other rows scored.
        rewards = WeightedRewards({"g": (lambda batch, spec=spec: grade(spec, batch.completions, [
            {"answer": a} for a in batch.answers]), 1.0)})
        scores = rewards(Completions(prompts=[[]] * 2, completions=["None", "12"], answers=[None, "12"],
                                     steps=[[], []]))
        assert scores.total.tolist() == [0.0, 1.0] and [e["row"] for e in scores.errors] == [0]
        assert "has no value in this row (None)" in scores.errors[0]["error"]
    defensive = {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}",
                 "reference": "{{ item.answer or item.solution }}"}  # a template that handles the missing answer
    assert grade(defensive, ["7"], [{"answer": None, "solution": "7"}]).scores == [1.0]


def test_regex_filter_arguments_are_checked_when_the_grader_loads(tmp_path):
    for written, words in (('regex("(")', "not a regular expression"),
                           ('regex("(a)", 2)', "the pattern has groups 0 to 1"),
                           ('regex(pattern="(a)(b)", group=3)', "the pattern has groups 0 to 2")):
        path = tmp_path / "grader.yaml"
        path.write_text(f"type: string_check\noperation: eq\ninput: '{{{{ sample.output_text | {written} }}}}'\n"
                        "reference: x\n")
        with pytest.raises(ConfigError, match=r"grader.yaml:3: input: \| regex") as info:
            load_grader(path)
        assert words in str(info.value)
    assert regex("ab", "ab", 3) == "ab"  # a pattern without groups: the whole match, whatever the group
    with pytest.raises(ValueError, match="groups 0 to 1"):  # a pattern only known when rendered
        regex("xa", "(a)", 2)


def test_a_grader_reading_the_answer_of_rows_that_have_none_is_refused_at_start_up(tmp_path):
    from posttrain.rewards.graders import absent_item_fields, check_grader_fields

    assert absent_item_fields([None, None], [[], []]) == ("answer", "steps")
    assert absent_item_fields([None, "3"], [[], ["a"]]) == ()
    assert absent_item_fields() == ()  # values not given: nothing known to be absent
    path = tmp_path / "grader.yaml"
    path.write_text('type: string_check\noperation: eq\ninput: "{{ sample.output_text }}"\n'
                    'reference: "{{ item.answer }}"\n')
    grader = load_grader(path)
    with pytest.raises(ConfigError, match=r"grader.yaml:4: reference: item.answer has no value in any row of the "
                                          r"data: .*data.columns.answer="):
        check_grader_fields(grader, ["prompt", "solution"], absent=("answer",))
    with pytest.raises(ConfigError, match="item.answer has no value in any row"):  # a column of nulls alike
        check_grader_fields(grader, ["prompt", "answer"], absent=("answer",))
    check_grader_fields(grader, ["prompt", "solution"])


# ---------------------------------------------------------------------------------------------- text_similarity


def similarity(metric, output, reference):
    spec = {"type": "text_similarity", "evaluation_metric": metric, "input": "{{ sample.output_text }}",
            "reference": "{{ item.ref }}"}
    return grade(spec, [output], [{"ref": reference}]).scores[0]


def test_text_similarity_by_hand():
    # Indel similarity: LCS(kitten, sitting) = "ittn" -> distance 6 + 7 - 2*4 = 5 -> 1 - 5/13.
    assert similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(8 / 13, abs=1e-12)
    # n-gram precisions 5/6, 3/5, 2/4, 1/3 (no zero counts, so no smoothing), brevity penalty 1.
    bleu = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert similarity("bleu", "the cat sat on the mat", "the cat sat on a mat") == pytest.approx(bleu, abs=1e-9)
    assert similarity("rouge_1", "the cat sat", "the cat ran") == pytest.approx(2 / 3, abs=1e-12)
    assert similarity("rouge_2", "the cat sat", "the cat ran") == pytest.approx(1 / 2, abs=1e-12)
    rouge_l = 2 * (2 / 4 * 2 / 3) / (2 / 4 + 2 / 3)  # LCS "the cat": P = 2/4, R = 2/3
    assert similarity("rouge_l", "the cat sat down", "the cat ran") == pytest.approx(rouge_l, abs=1e-12)
    # GLEU = min(precision, recall) over 1..4-grams: 3 matches (2 + 1 + 0) of 6 n-grams on each side.
    assert similarity("gleu", "the cat sat", "the cat ran") == pytest.approx(0.5, abs=1e-12)
    assert similarity("fuzzy_match", "same", "same") == 1.0


def test_rouge_reads_words_of_every_script():
    """rouge-score's tokenizer keeps only [a-z0-9]: identical Russian or Japanese texts scored 0."""
    assert similarity("rouge_1", "Кошка сидит", "кошка сидит") == 1.0
    assert similarity("rouge_1", "кошка сидит", "кошка спит") == pytest.approx(1 / 2, abs=1e-12)
    # each Han/kana character is a word: 猫が座った against 猫が寝た share 猫, が, た of 5 and 4 -> F = 2*3/(5+4)
    assert similarity("rouge_1", "猫が座った", "猫が寝た") == pytest.approx(6 / 9, abs=1e-12)
    assert similarity("rouge_l", "東京 2024", "東京 2024") == 1.0
    assert similarity("rouge_1", "the cat_sat", "the cat sat") == 1.0  # "_" separates words, as in rouge-score


def test_text_similarity_pass_threshold():
    spec = {"type": "text_similarity", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.6,
            "input": "{{ sample.output_text }}", "reference": "{{ item.ref }}"}
    assert grade(spec, ["kitten", "dog"], [{"ref": "sitting"}] * 2).scores == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------- python


SANDBOX_PROBE = textwrap.dedent("""
    import os, socket

    def grade(sample, item):
        kind = item["kind"]
        if kind == "loop":
            while True:
                pass
        if kind == "network":
            socket.create_connection(("127.0.0.1", 9), timeout=1)
            return 1.0
        if kind == "environment":
            return 0.5 if "POSTTRAIN_TEST_SECRET" not in os.environ and "HOME" not in os.environ else 1.0
        if kind == "cwd":
            return 0.25 if os.listdir(".") == [] and "runs" not in os.getcwd() else 1.0
        if kind == "memory":
            hog = bytearray(2 * 1024 ** 3)
            return 1.0
        if kind == "exception":
            raise RuntimeError("boom")
        if kind == "text":
            return "1.0"
        if kind == "nan":
            return float("nan")
        if kind == "too_big":
            return 1.5
        if kind == "scalar":  # as numpy's and torch's scalars (np.array([0, 1]).max()): a number through .item()
            return type("Scalar", (), {"item": lambda self: 0.75})()
        return len(sample["output_text"]) / 10
""")


def test_python_grader_sandbox(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    kinds = ["ok", "loop", "network", "environment", "cwd", "memory", "exception", "text", "nan", "too_big", "scalar",
             "ok"]
    spec = {"type": "python", "source": SANDBOX_PROBE, "timeout_s": 1.0, "memory_mb": 256}
    result = grade(spec, ["abc"] * len(kinds), [{"kind": k} for k in kinds])
    scores, errors = dict(zip(kinds, result.scores, strict=False)), dict(zip(kinds, result.errors, strict=False))
    assert result.scores[0] == result.scores[-1] == pytest.approx(0.3)  # and a fresh process after the timeout
    assert scores["environment"] == 0.5 and errors["environment"] is None
    assert scores["cwd"] == 0.25 and errors["cwd"] is None
    assert scores["scalar"] == 0.75 and errors["scalar"] is None
    for kind in ("loop", "network", "memory", "exception", "text", "nan", "too_big"):
        assert scores[kind] == 0.0 and errors[kind], kind
    assert "timed out" in errors["loop"]
    assert "PermissionError" in errors["network"] or "OSError" in errors["network"]
    assert "MemoryError" in errors["memory"] or "killed" in errors["memory"]
    assert "RuntimeError: boom" in errors["exception"]
    assert "str" in errors["text"] and "finite" in errors["nan"] and "outside" in errors["too_big"]
    assert result.error_count == 7


def test_python_grader_source_that_fails_to_load_scores_zero_everywhere():
    result = grade({"type": "python", "source": "import no_such_module\ndef grade(s, i):\n    return 1.0\n"},
                   ["a", "b"], [{}, {}])
    assert result.scores == [0.0, 0.0] and all("No module named" in e for e in result.errors)


def test_python_grader_source_is_checked_without_running():
    with pytest.raises(ConfigError, match="must define"):
        build_grader({"type": "python", "source": "def score(s, i):\n    return 1\n"})
    with pytest.raises(ConfigError, match="does not parse"):
        build_grader({"type": "python", "source": "def grade(s, i) return 1\n"})


# ---------------------------------------------------------------------------------------------- multi


def test_multi_grader_combines_and_logs_parts():
    spec = {"type": "multi", "calculate_output": "0.7 * exact + 0.3 * close", "graders": {
        "exact": {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text | last_number }}",
                  "reference": "{{ item.answer }}"},
        "close": {"type": "python", "source": "def grade(s, i):\n    x = int(s['output_text'][-2:])\n"
                                              "    return 1 / (1 + abs(x - int(i['answer'])))\n"}}}
    result = grade(spec, ["so 12", "so 10"], [{"answer": "12"}] * 2)
    assert result.scores == pytest.approx([1.0, 0.3 * (1 / 3)])
    assert result.components == {"exact": [1.0, 0.0], "close": pytest.approx([1.0, 1 / 3])}


def test_multi_formula_failure_scores_zero_with_error():
    spec = {"type": "multi", "calculate_output": "a / b", "graders": {
        "a": {"type": "string_check", "operation": "eq", "input": "x", "reference": "x"},
        "b": {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}", "reference": "y"}}}
    result = grade(spec, ["y", "z"], [{}, {}])
    assert result.scores == [1.0, 0.0] and result.errors[0] is None and "ZeroDivisionError" in result.errors[1]


def test_multi_row_whose_inner_grader_failed_scores_zero():
    """An inner grader's error scored its part 0 and the formula the rest (0.7 of `0.7*exact + 0.3*close`)."""
    spec = {"type": "multi", "calculate_output": "0.7 * exact + 0.3 * close", "graders": {
        "exact": {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}", "reference": "5"},
        "close": {"type": "python", "source": "def grade(s, i):\n    if s['output_text'] == '5':\n"
                                              "        raise ValueError('broken')\n    return 1.0\n"}}}
    result = grade(spec, ["5", "6"], [{}, {}])
    assert result.scores == pytest.approx([0.0, 0.3])
    assert result.errors[0].startswith("close: ValueError: broken") and result.errors[1] is None


def test_formula_functions_take_their_number_of_arguments():
    """`max(exact)` loaded, then raised TypeError on every sample."""
    for bad in ("max(a)", "min(a)", "abs(a, b)", "sqrt()", "log(a, b, c)"):
        with pytest.raises(ValueError, match="takes"):
            Formula(bad, ["a", "b", "c"])
    assert Formula("log(a, b) + max(a, b, c)", ["a", "b", "c"])({"a": 8.0, "b": 2.0, "c": 1.0}) == pytest.approx(11.0)


def test_formula_evaluates_arithmetic_only():
    formula = Formula("min(a, b) + 0.5 * -c ** 2 / 2 + abs(-1) - max(a, 1)", ["a", "b", "c"])
    assert formula({"a": 0.25, "b": 0.5, "c": 2.0}) == pytest.approx(0.25 - 1.0 + 1 - 1)
    for bad in ("__import__('os').system('true')", "a.real", "a[0]", "(lambda: 1)()", "d + a", "[a for a in b]",
                "open('x')", "'text'", "a if b else c", "a > b", "a; b", "getattr(a, 'x')", "min(a, key=b)",
                "True + a", "a @ b", "a // b", "(a := 1)"):
        with pytest.raises(ValueError):
            Formula(bad, ["a", "b", "c"])


def test_formula_powers_of_integers_overflow_with_an_error_instead_of_running_on():
    """`a * 0 ** 9 ** 9 ** 9` passed the whitelist and computed an integer of 9^(9^9) digits in the trainer."""
    for text in ("a * 0 ** 9 ** 9 ** 9", "a * floor(9) ** floor(9) ** floor(9) ** floor(9)"):
        with pytest.raises(OverflowError):
            Formula(text, ["a"])({"a": 1.0})
    spec = {"type": "multi", "calculate_output": "0 * 9 ** 9 ** 9 + exact", "graders": {
        "exact": {"type": "string_check", "operation": "eq", "input": "{{ sample.output_text }}", "reference": "5"}}}
    result = grade(spec, ["5"], [{}])  # that sample's error, scored 0
    assert result.scores == [0.0] and "OverflowError" in result.errors[0]


# ---------------------------------------------------------------------------------------------- score_model


def test_score_model_reward_model_is_clipped_and_scaled(tmp_path, tiny_model, tokenizer):
    from posttrain.models import save_pretrained
    from posttrain.models.reward import build_reward_model
    from posttrain.rewards import RewardModelScorer

    lm = save_pretrained(tiny_model, tokenizer, tmp_path / "lm")
    rm = save_pretrained(build_reward_model(lm, pad_token_id=tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    outputs = ["5", "seven", "12"]
    items = [{"question": "What is 2+3?", "messages": [message("user", "What is 2+3?")]}] * 3
    raw = RewardModelScorer.from_pretrained(rm).score([[{"role": "user", "content": "What is 2+3?"}]] * 3, outputs)
    low, high = float(raw.min()), float(raw.max()) - 1e-3  # the largest score is clipped to high
    scores = grade({"type": "score_model", "model": str(rm), "range": [low, high]}, outputs, items).scores
    expected = [(min(high, max(low, float(r))) - low) / (high - low) for r in raw]
    assert scores == pytest.approx(expected, abs=1e-6) and max(scores) == 1.0 and min(scores) == 0.0


def test_score_model_reward_model_reads_the_rows_whole_conversation_without_input(tmp_path, tiny_model, tokenizer):
    """Its default input was the last message alone (`item.question`): a system prompt and earlier turns were lost,
    and the same reward model scored otherwise than through reward.model_path. A given `input` is still what it
    reads."""
    from posttrain.models import save_pretrained
    from posttrain.models.reward import build_reward_model
    from posttrain.rewards import RewardModelScorer
    from posttrain.rewards.graders import completion_records

    lm = save_pretrained(tiny_model, tokenizer, tmp_path / "lm")
    rm = save_pretrained(build_reward_model(lm, pad_token_id=tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    prompt = [message("system", "Answer in words."), message("user", "What is 2+3?"), message("assistant", "five"),
              message("user", "And 2+4?")]
    outputs = ["six", "6", "seven"]
    samples, items = completion_records([prompt] * 3, outputs, ["6"] * 3, [[]] * 3)
    scorer = RewardModelScorer.from_pretrained(rm)
    whole = scorer.score_rows([prompt] * 3, outputs)[0]
    last = scorer.score([[{"role": "user", "content": "And 2+4?"}]] * 3, outputs)
    assert not torch.allclose(whole, last)  # the two inputs differ for this model
    low, high = float(min(whole.min(), last.min())) - 1, float(max(whole.max(), last.max())) + 1
    spec = {"type": "score_model", "model": str(rm), "range": [low, high]}
    scores = build_grader(spec).grade(samples, items).scores
    assert scores == pytest.approx([(float(r) - low) / (high - low) for r in whole], abs=1e-6)
    explicit = build_grader({**spec, "input": [{"role": "user", "content": "{{ item.question }}"},
                                               {"role": "assistant", "content": "{{ sample.output_text }}"}]})
    assert explicit.grade(samples, items).scores == pytest.approx([(float(r) - low) / (high - low) for r in last],
                                                                 abs=1e-6)


def test_score_model_takes_a_likelihood_reward_model_for_a_reward_model_not_a_judge(tmp_path, tiny_model, tokenizer):
    """It is saved as a causal LM (LlamaForCausalLM): its config's reward_head, not the architecture, says it scores."""
    from posttrain.models import save_pretrained
    from posttrain.models.reward import build_reward_model
    from posttrain.rewards import RewardModelScorer

    lm = save_pretrained(tiny_model, tokenizer, tmp_path / "lm")
    rm = save_pretrained(build_reward_model(lm, head="likelihood", reward_scale=0.5), tokenizer, tmp_path / "rm")
    outputs = ["5", "seven", "12"]
    items = [{"question": "What is 2+3?", "messages": [message("user", "What is 2+3?")]}] * 3
    raw = RewardModelScorer.from_pretrained(rm).score([[{"role": "user", "content": "What is 2+3?"}]] * 3, outputs)
    low, high = float(raw.min()), float(raw.max())
    scores = grade({"type": "score_model", "model": str(rm), "range": [low, high]}, outputs, items).scores
    assert scores == pytest.approx([(float(r) - low) / (high - low) for r in raw], abs=1e-6)


def test_score_model_judge_reads_the_score_its_answer_states(tmp_path, tiny_model, tokenizer, monkeypatch):
    from posttrain.models import save_pretrained
    from posttrain.rewards.graders.score_model import ScoreModelGrader

    judge = save_pretrained(tiny_model, tokenizer, tmp_path / "judge")
    spec = {"type": "score_model", "model": str(judge), "range": [1, 11],
            "input": [{"role": "system", "content": "Grade 1-11."},
                      {"role": "user", "content": "Q: {{ item.question }} A: {{ sample.output_text }}"}]}
    grader = build_grader(spec)
    prompts = []
    answers = ["Score: 8", "no idea", "42", "I give it 3 then 6", "Score: 3/11", "I'd rate it 2 out of 11.",
               "Rating: 4. Question 10 is wrong", "**Score:** 9.5", "7", "5/10", "Score: 12",
               "The answer 5/10 is wrong in step 2. Score: 2", "It got 1/2 of 8 right. Rating: 9",
               "12/4 = 3, so 3 of 11 steps hold: 4/11"]
    monkeypatch.setattr(ScoreModelGrader, "_judge", lambda self, conv: prompts.extend(conv) or answers)
    result = grader.grade([{"output_text": o} for o in "abcdefghijklmn"], [{"question": "q"}] * len(answers))
    # (x - 1) / 10; "3/11" is 3 out of the range's 11 (the last number, 11, gave full marks), "5/10" is out of
    # another maximum, "3 then 6" two numbers without a label, 12 and 42 out of range: errors, scored 0; a labelled
    # score beats the fractions a judge quotes, and one fraction out of 11 beats the others
    assert result.scores == pytest.approx([0.7, 0.0, 0.0, 0.0, 0.2, 0.1, 0.3, 0.85, 0.6, 0.0, 0.0, 0.1, 0.8, 0.3])
    assert [e is None for e in result.errors] == [True, False, False, False, True, True, True, True, True, False,
                                                  False, True, True, True]
    assert "out of 10" in result.errors[9] and "2 numbers" in result.errors[3] and "not in [1, 11]" in result.errors[2]
    assert prompts[0][1] == {"role": "user", "content": "Q: q A: a"}
    monkeypatch.undo()
    real = grader.grade([{"output_text": "a"}], [{"question": "q"}])  # the untrained judge really generates
    assert real.scores[0] in (0.0, *[(k - 1) / 10 for k in range(1, 12)])


def test_score_model_reward_model_that_scores_nan_is_an_error_not_the_range_floor(tmp_path, tiny_model, tokenizer,
                                                                                   monkeypatch):
    from posttrain.models import save_pretrained
    from posttrain.models.reward import build_reward_model
    from posttrain.rewards import RewardModelScorer

    lm = save_pretrained(tiny_model, tokenizer, tmp_path / "lm")
    rm = save_pretrained(build_reward_model(lm, pad_token_id=tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    monkeypatch.setattr(RewardModelScorer, "score_rows", lambda self, prompts, completions, tools: (
        torch.tensor([float("nan"), 100.0, -100.0, 0.0]), [None] * 4))  # a diverged reward model's first score
    result = grade({"type": "score_model", "model": str(rm), "range": [-5, 5]}, ["a", "b", "c", "d"],
                   [{"question": "q", "messages": [message("user", "q")]}] * 4)
    assert result.scores == pytest.approx([0.0, 1.0, 0.0, 0.5])
    assert "not a finite number" in result.errors[0] and result.errors[1:] == [None, None, None]


def test_teacher_grader_whose_student_gives_nan_is_an_error_not_full_credit(tmp_path, tiny_model, tokenizer,
                                                                          monkeypatch):
    from posttrain.models import save_pretrained
    from posttrain.rewards.graders.teacher import TeacherGrader

    student = save_pretrained(tiny_model, tokenizer, tmp_path / "student")
    values = iter([(float("nan"), -1.0), (-1.0, float("nan")), (float("-inf"), -1.0), (-0.5, -1.0)])
    monkeypatch.setattr(TeacherGrader, "student_logprobs", lambda self, q, e, a: next(values))
    result = grade({"type": "teacher", "student": str(student), "question": "{{ item.question }}",
                    "answer": "{{ item.answer }}", "penalty": 0.5}, ["x"] * 4, [{"question": "q", "answer": "1"}] * 4)
    assert result.scores == pytest.approx([0.0, 0.0, 0.0, math.exp(-1.0)])
    assert [e is None for e in result.errors] == [False, False, True, True]


# ---------------------------------------------------------------------------------------------- teacher


@pytest.mark.parametrize("separator, gold", [(" so ", "7"), ("\nAnswer: ", "seven")])
def test_teacher_grader_matches_a_token_by_token_computation(tmp_path, tiny_model, tokenizer, separator, gold):
    """The student reads explanation, separator and answer as one text: with "\nAnswer: " and "seven" the answer's
    first token carries the separator's space ("Ġseven"); tokenised apart they were " " and "seven"."""
    from posttrain.data.config import DataConfig
    from posttrain.data.tokenize import Encoder
    from posttrain.models import save_pretrained

    student = save_pretrained(tiny_model, tokenizer, tmp_path / "student")
    spec = {"type": "teacher", "student": str(student), "question": "{{ item.question }}",
            "answer": "{{ item.answer }}", "penalty": 0.5, "separator": separator}
    result = grade(spec, ["3 plus 4 is 7"], [{"question": "What is 3+4?", "answer": gold}])
    # Slow and obvious: one forward per predicted token.
    encoder = Encoder.from_config(tokenizer, DataConfig())
    prompt = encoder.encode_prompt([{"role": "user", "content": "What is 3+4?", "reasoning": None}])
    # the student reads the text whole; the explanation's tokens are those whose text ends before the answer's
    before = "3 plus 4 is 7" + separator
    whole = tokenizer.encode(before + gold, add_special_tokens=False)
    cut = max(k for k in range(len(whole) + 1) if len(tokenizer.decode(whole[:k])) <= len(before))
    explain, answer = whole[:cut], whole[cut:]
    ids = prompt + explain + answer

    def logp(t):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
        return (logits.log_softmax(-1)[ids[t]]).item()

    explain_logp = sum(logp(t) for t in range(len(prompt), len(prompt) + len(explain))) / len(explain)
    answer_logp = sum(logp(t) for t in range(len(prompt) + len(explain), len(ids))) / len(answer)
    assert result.scores[0] == pytest.approx(math.exp(answer_logp + 0.5 * explain_logp), rel=1e-4)
    assert 0 < result.scores[0] < 1


# ---------------------------------------------------------------------------------------------- files, rewards


def test_shipped_grader_as_a_weighted_reward_logs_parts_and_errors():
    rewards = WeightedRewards({"grader": (grader_reward(grader_path="arith-partial"), 2.0)})
    batch = Completions(prompts=[[{"role": "user", "content": "What is 6+6?"}]] * 3, completions=["12", "10", "x"],
                        answers=["12"] * 3, steps=[[]] * 3)
    scores = rewards(batch)
    assert scores.total.tolist() == pytest.approx([2.0, 2 * 0.3 / 3, 0.0])
    assert scores.by_function["grader.exact"].tolist() == [1.0, 0.0, 0.0]
    assert scores.by_function["grader.close"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert scores.by_function["grader.errors"].tolist() == [0.0, 0.0, 0.0] and scores.errors == []


def test_shipped_arith_grader_reads_numbers_as_the_gold_answers_are_written():
    """Gold answers the data check accepts ("1,035", "+68") and answers written with separators, a zero fraction or
    the minus sign: "9,801" scored 0.7 (its closeness read 801), a gold "1,035" failed every row."""
    grader = load_grader("arith-partial")
    cases = [("9,801", "9801", 1.0), ("So 23*45 = 1,035.", "1,035", 1.0), ("68", "+68", 1.0), ("12.0", "12", 1.0),
             ("\u22125", "-5", 1.0), ("\u22125", "5", 0.3 / 11), ("12.5", "12", 0.3 / 1.5), ("5.7", "5", 0.3 / 1.7)]
    result = grader.grade([{"output_text": text} for text, _, _ in cases], [{"answer": gold} for _, gold, _ in cases])
    assert result.scores == pytest.approx([score for *_, score in cases]) and result.error_count == 0


def test_grader_errors_become_records_in_the_scores():
    rewards = WeightedRewards({"g": (lambda batch: build_grader(
        {"type": "python", "source": "def grade(s, i):\n    return 1 / len(s['output_text'])\n"}).grade(
        [{"output_text": c} for c in batch.completions], [{}] * len(batch)), 1.0)})
    scores = rewards(Completions(prompts=[[]] * 2, completions=["ab", ""], answers=["", ""], steps=[[], []]))
    assert scores.total.tolist() == [0.5, 0.0] and scores.by_function["g.errors"].tolist() == [0.0, 1.0]
    assert scores.errors[0]["row"] == 1 and "ZeroDivisionError" in scores.errors[0]["error"]


def write(tmp_path, text):
    path = tmp_path / "grader.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("text, field, line, message", [
    ("type: string_check\ninput: x\nreference: y\noperation: equals\n", "operation", 4, "not one of"),
    ("type: strng_check\n", "type", 1, "not one of"),
    ("type: multi\ngraders:\n  a:\n    type: string_check\n    input: '{{ sample.output_text }'\n"
     "    reference: x\n    operation: eq\ncalculate_output: a\n", "graders.a.input", 5, "syntax"),
    ("type: multi\ngraders:\n  a: {type: string_check, input: x, reference: x, operation: eq}\n"
     "calculate_output: a + __import__('os')\n", "calculate_output", 4, "not allowed"),
    ("type: text_similarity\ninput: x\nreference: y\nevaluation_metric: bleu\nthreshold: 1\n", "threshold", 5,
     "unknown key"),
    ("type: python\nsource: 3\n", "source", 2, "not a text"),
    ("type: score_model\nmodel: /nonexistent\n", "model", 2, "no model directory"),
])
def test_bad_grader_yaml_names_file_line_and_field(tmp_path, text, field, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_grader(path)
    assert err.value.field == field and err.value.line == line and err.value.file == str(path)


def test_missing_item_field_is_a_config_error_naming_the_template(tmp_path):
    grader = load_grader(write(tmp_path, "type: string_check\ninput: x\nreference: '{{ item.anwser }}'\n"
                                         "operation: eq\n"))
    with pytest.raises(ConfigError, match="anwser") as err:
        grader.grade([{"output_text": "x"}], [{"answer": "x"}])
    assert err.value.field == "reference" and err.value.line == 3


def test_templates_are_sandboxed():
    spec = {"type": "string_check", "operation": "eq", "reference": "x",
            "input": "{{ sample.__class__.__mro__[1].__subclasses__() }}"}
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        grade(spec, ["x"], [{}])


def test_the_shipped_teacher_grader_scores_explanations_by_the_students_likelihood(tmp_path, monkeypatch,
                                                                                 tiny_model, tokenizer):
    from posttrain.data.config import DataConfig
    from posttrain.data.tokenize import Encoder
    from posttrain.models import save_pretrained

    monkeypatch.chdir(tmp_path)
    save_pretrained(tiny_model, tokenizer, tmp_path / "runs" / "sft" / "final")  # the config's student
    rewards = WeightedRewards({"grader": (grader_reward(grader_path="teacher-arith"), 1.0)})
    prompt = "What is 2+2? 4\nWhat is 3+4? The answer is 7. Explain it."
    explanations = ["3 plus 4 is 7", "add three to four"]
    scores = rewards(Completions(prompts=[[{"role": "user", "content": prompt}]] * 2, completions=explanations,
                                 answers=["7", "7"], steps=[[], []]))
    # By hand: the student reads the last "What is ...?" of the prompt, then explanation, "\nAnswer: ", answer.
    encoder = Encoder.from_config(tokenizer, DataConfig())
    question = encoder.encode_prompt([{"role": "user", "content": "What is 3+4?", "reasoning": None}])
    answer = tokenizer.encode("7", add_special_tokens=False)
    for explanation, score in zip(explanations, scores.total.tolist(), strict=True):
        explain = tokenizer.encode(explanation + "\nAnswer: ", add_special_tokens=False)
        ids = question + explain + answer
        with torch.no_grad():
            logprobs = tiny_model(input_ids=torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        token_logprobs = logprobs.gather(-1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        explain_logp = token_logprobs[len(question) - 1:len(question) - 1 + len(explain)].mean().item()
        answer_logp = token_logprobs[len(question) - 1 + len(explain):].mean().item()
        assert score == pytest.approx(math.exp(min(0.0, answer_logp + 0.1 * explain_logp)), rel=1e-4)
    assert scores.total[0] != scores.total[1]
