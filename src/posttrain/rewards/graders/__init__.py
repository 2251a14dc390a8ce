"""Graders: YAML-declared scorers in the public fine-tuning grader schema, each giving credit in [0, 1].

    string_check      eq / ne / like / ilike between the rendered input and reference      (0 or 1)
    text_similarity   fuzzy_match, bleu, gleu, rouge_1..5, rouge_l (rapidfuzz, sacrebleu, nltk, rouge-score)
    python            the user's `grade(sample, item) -> float`, run in a locked-down child process
    score_model       a reward model, or a chat model as judge with a prompt and a score range
    multi             several graders combined by an arithmetic formula over their names
    teacher           RLT teacher reward: how much an explanation helps a student predict the answer

Templates reference `{{ sample.output_text }}` and `{{ item.<field> }}` (question, answer, steps,
messages, and every column of the data row, e.g. `{{ item.solution }}`), with answer extraction
filters: `| last_number`, `| boxed`, `| answer_line`, `| regex("...")`. A grader file is one grader mapping:

    type: multi
    graders:
      exact: {type: string_check, operation: eq, input: "{{ sample.output_text | last_number }}",
              reference: "{{ item.answer }}"}
      close: {type: text_similarity, evaluation_metric: fuzzy_match, input: "{{ sample.output_text }}",
              reference: "{{ item.answer }}"}
    calculate_output: 0.8 * exact + 0.2 * close

`load_grader(path_or_name)` reads one (shipped ones by name: `arith-partial`); every mistake is a
ConfigError with the file, line and field. `grader_reward(grader)` makes it a reward function for
`WeightedRewards` (the `grader` entry of `reward.functions` in GRPO, PPO and RFT).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.config import read_yaml_with_lines
from posttrain.errors import ConfigError
from posttrain.rewards.graders.base import Grader, GradeResult, Item, Sample, Spec, checked_score
from posttrain.rewards.graders.extract import answer_line, boxed, last_number, regex
from posttrain.rewards.graders.multi import Formula, MultiGrader
from posttrain.rewards.graders.python_grader import PythonGrader
from posttrain.rewards.graders.score_model import ScoreModelGrader
from posttrain.rewards.graders.string_check import StringCheckGrader
from posttrain.rewards.graders.teacher import TeacherGrader
from posttrain.rewards.graders.template import Template
from posttrain.rewards.graders.text_similarity import TextSimilarityGrader

GRADERS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "graders"
GRADER_TYPES = {"string_check": StringCheckGrader, "text_similarity": TextSimilarityGrader, "python": PythonGrader,
                "score_model": ScoreModelGrader, "multi": MultiGrader, "teacher": TeacherGrader}


def build_grader(spec: Spec | Mapping[str, Any]) -> Grader:
    """A grader from its mapping (a `Spec` carries the file and lines for error messages)."""
    if not isinstance(spec, Spec):
        spec = Spec(spec)
    kind = spec.get("type", str, choices=tuple(GRADER_TYPES))
    if kind == "multi":
        return MultiGrader(spec, build_grader)
    return GRADER_TYPES[kind](spec)


def load_grader(path_or_name: str | Path) -> Grader:
    """A grader from a YAML file, or a shipped one by name (recipes/configs/graders/<name>.yaml)."""
    path = Path(path_or_name)
    if not path.is_file() and (GRADERS_DIR / f"{path_or_name}.yaml").is_file():
        path = GRADERS_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in GRADERS_DIR.glob("*.yaml")))
        raise ConfigError(f"grader file not found (shipped graders: {shipped})", file=str(path))
    data, lines = read_yaml_with_lines(path, "grader")
    return build_grader(Spec(data, file=str(path), lines=lines))


def check_grader_fields(grader: Grader, columns: Collection[str], absent: Collection[str] = ()) -> None:
    """Every template of the grader (and of the graders inside it) reads only `sample.output_text` and fields the
    items will have: `columns` (the data row's) and question, answer, steps, messages, but for the `absent` ones
    (`absent_item_fields`: no row has a value for them). A ConfigError at start-up names the grader file, line and
    key."""
    available = {"sample": SAMPLE_FIELDS, "item": {*columns, *ITEM_FIELDS} - set(absent)}
    why = {field: f"has no value in any row of the data: {ABSENT_HINTS[field]}" for field in absent}
    for template in _templates(grader):
        template.check_fields(available, why)


def absent_item_fields(answers: Iterable[str | None] | None = None,
                       steps: Iterable[Sequence[str] | None] | None = None) -> tuple[str, ...]:
    """The item fields no row gives a value, of those whose values are given: answer (every row prompt-only),
    steps (no row has any)."""
    return tuple(field for field, values in (("answer", answers), ("steps", steps)) if values is not None
                 and not any(value is not None and (field == "answer" or len(value)) for value in values))


ABSENT_HINTS = {
    "answer": "the rows hold no gold answer in an `answer` column (a gold column of another name is item.<its "
              "name>, or data.columns.answer=<its name> makes it the answer)",
    "steps": "the rows hold no `steps` column (a list of reference steps)",
}


def _templates(value: Any) -> list[Template]:
    if isinstance(value, Template):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _templates(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _templates(v)]
    if hasattr(value, "grade"):  # a grader: its templates, and those of the graders inside it
        return [t for v in vars(value).values() for t in _templates(v)]
    return []


SAMPLE_FIELDS = ("output_text",)
ITEM_FIELDS = ("question", "answer", "steps", "messages")


def completion_records(prompts: Sequence[Sequence[Mapping[str, Any]]], completions: Sequence[str],
                       answers: Sequence[str | None], steps: Sequence[Sequence[str]],
                       columns: Sequence[Mapping[str, Any]] = ()) -> tuple[list[Sample], list[Item]]:
    """The `sample` and `item` a grader sees for each completion of a batch: the item is every column of the
    completion's row (`{{ item.solution }}`) and question, answer, steps and messages."""
    samples = [{"output_text": text} for text in completions]
    rows = columns or [{} for _ in completions]
    items = [{**row, "question": prompt[-1]["content"], "answer": answer, "steps": list(chain),
              "messages": list(prompt)}
             for prompt, answer, chain, row in zip(prompts, answers, steps, rows, strict=True)]
    return samples, items


__all__ = ["GRADER_TYPES", "Formula", "GradeResult", "Grader", "Item", "Sample", "Spec", "absent_item_fields",
           "answer_line", "boxed", "build_grader", "check_grader_fields", "checked_score", "completion_records",
           "last_number", "load_grader", "regex"]
