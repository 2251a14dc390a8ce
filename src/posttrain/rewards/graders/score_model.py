"""`score_model`: a local model grades the sample; the score is mapped from `range` [lo, hi] onto [0, 1].

Two kinds of model, told apart by the saved model itself:
- a reward model (`posttrain rm`, a sequence-classification head): the rendered `input` messages are the
  conversation, the last one the assistant turn being graded (without `input`: the row's own prompt messages,
  rendered with its tools, and the sample); its scalar r gives (clip(r, lo, hi) - lo) / (hi - lo);
- a chat model as judge: the rendered `input` messages are its prompt, it answers greedily
  (`sampling_params.max_new_tokens`), and the score it states (`judge_score`: "7", "Score: 7", "7/10",
  "7 out of 10"), which must lie in the range, gives (x - lo) / (hi - lo). An answer that states none, states
  it out of another maximum than hi, or holds several numbers and no labelled score scores 0 with an error.
A reward model's score that is not a finite number scores 0 with an error too.

Models load on first use, so validating a grader file costs nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.rewards.graders.base import GradeResult, Item, Sample, Spec
from posttrain.rewards.graders.extract import NUMBER, number_text
from posttrain.rewards.graders.template import Template

DEFAULT_INPUT = [{"role": "user", "content": "{{ item.question }}"},
                 {"role": "assistant", "content": "{{ sample.output_text }}"}]


class ScoreModelGrader:
    def __init__(self, spec: Spec) -> None:
        spec.only("type", "name", "model", "input", "range", "sampling_params")
        self.name = spec.get("name", str, "score_model")
        self.path = Path(spec.get("model", str))
        self.field = spec.prefix + "model"  # what a load error names (the model loads at the first grade)
        config = self.path / "config.json"
        if not config.is_file():
            raise spec.error(f"no model directory at {self.path} (config.json missing)", "model")
        saved = json.loads(config.read_text())
        architectures = saved.get("architectures") or [""]
        # A likelihood reward model is saved as a causal LM: its config's reward_head says it scores, not judges.
        self.is_reward_model = architectures[0].endswith("ForSequenceClassification") or "reward_head" in saved
        messages = spec.get("input", list, None)
        # Without `input` a reward model reads the row's whole conversation (system prompt, earlier turns, tool
        # results; rendered with the row's tools) and the sample after it, as `reward.model_path` does: the same
        # model then gives the same score by either route (a template of its messages cannot spell a list of turns)
        self.messages = (None if messages is None and self.is_reward_model
                         else [_message(spec, i, m) for i, m in enumerate(DEFAULT_INPUT if messages is None
                                                                           else messages)])
        if self.messages is not None and self.is_reward_model and (not self.messages
                                                                    or self.messages[-1][0] != "assistant"):
            raise spec.error("a reward model grades the last message: it must be the assistant's", "input")
        bounds = spec.get("range", list, [0, 1])
        if (len(bounds) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)
                or not bounds[0] < bounds[1]):
            raise spec.error("must be [low, high] with low < high", "range")
        self.low, self.high = float(bounds[0]), float(bounds[1])
        params = spec.child("sampling_params").data if "sampling_params" in spec.data else {}
        self.max_new_tokens = int(params.get("max_new_tokens", 16))
        self._scorer: Any = None

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        if self.is_reward_model:
            return self._reward_model_grades(samples, items)
        scores, errors = [], []
        for answer in self._judge(self._conversations(samples, items)):
            value, error = judge_score(answer, self.high)
            if error is None and not self.low <= value <= self.high:
                error = f"the judge's score {value:g} is not in [{self.low:g}, {self.high:g}]: {answer!r}"
            scores.append(0.0 if error else self._scale(value))
            errors.append(error)
        return GradeResult(scores, errors=errors)

    def _conversations(self, samples: Sequence[Sample], items: Sequence[Item]) -> list[list[dict[str, str]]]:
        return [[{"role": role, "content": content.render(s, i)} for role, content in self.messages]
                for s, i in zip(samples, items, strict=True)]

    def _reward_model_grades(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        if self.messages is None:  # the row's own conversation, with its tools
            prompts, tools = [i["messages"] for i in items], [i.get("tools") for i in items]
            completions = [s["output_text"] for s in samples]
        else:
            conversations = self._conversations(samples, items)
            prompts, tools, completions = [c[:-1] for c in conversations], None, [c[-1]["content"]
                                                                                  for c in conversations]
        values, errors = self._reward_model().score_rows(prompts, completions, tools)
        raw = values.tolist()
        errors = [e or (None if math.isfinite(r) else f"the reward model scored {r}, not a finite number")
                  for r, e in zip(raw, errors, strict=True)]
        return GradeResult([0.0 if e else self._scale(min(self.high, max(self.low, r)))
                            for r, e in zip(raw, errors, strict=True)], errors=errors)

    def _scale(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)

    def _reward_model(self):
        if self._scorer is None:
            from posttrain.rewards.reward_model import RewardModelScorer

            self._scorer = RewardModelScorer.from_pretrained(self.path, field=self.field)
        return self._scorer

    def _judge(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        import torch

        from posttrain.data.config import DataConfig
        from posttrain.data.tokenize import Encoder
        from posttrain.models import load_causal_lm, load_tokenizer
        from posttrain.rollout import SamplingParams, make_engine

        if self._scorer is None:
            tokenizer = load_tokenizer(self.path)
            engine = make_engine("local", load_causal_lm(self.path).eval(), tokenizer)
            self._scorer = (Encoder.from_config(tokenizer, DataConfig(truncation="truncate_left")), engine)
        encoder, engine = self._scorer
        prompts = [encoder.encode_prompt([{**m, "reasoning": None} for m in c]) for c in conversations]
        with torch.no_grad():
            rollout = engine.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0))
        return list(rollout.texts)


_MAXIMUM = rf"(?:\s*(?:/|out\s+of)\s*({NUMBER.pattern}))"
# "7/10", "7 / 10", "7 out of 10": a score and the maximum it is out of.
_OUT_OF = re.compile(rf"({NUMBER.pattern}){_MAXIMUM}", re.IGNORECASE)
# "Score: 7", "rating = 7", "Grade: 7/10", "**Score:** 7", "Score (1-10): 7": a labelled score, maybe with its maximum
# (the label's punctuation keeps no sign: "Score: -1" is -1; a range in brackets after the label is no score).
_LABELLED = re.compile(rf"\b(?:score|rating|grade)\b(?:\s*\([^()]{{0,30}}\))?[^\w+\-\u2212]{{0,4}}({NUMBER.pattern})"
                       rf"{_MAXIMUM}?", re.IGNORECASE)


def judge_score(answer: str, high: float) -> tuple[float, str | None]:
    """The score a judge's answer states, out of `high`, or (0, why not).

    In order: a labelled score ("Score: 3", "Rating: 3/10"; the last one); else a score out of `high` ("3/10",
    "3 out of 10"), the only one the answer gives; else the answer's only number. A maximum other than `high`, or
    several numbers and neither form, is an error, not a guess: the last number gave "3/10" full marks, and a
    fraction the judge quotes ("5/10 of the steps are wrong. Score: 2") is not its score.
    """
    def number(text: str) -> float:
        return float(number_text(text))

    def out_of(value: str, maximum: str) -> tuple[float, str | None]:
        if maximum and number(maximum) != high:
            return 0.0, f"the judge scored out of {number(maximum):g}, not out of the range's {high:g}: {answer!r}"
        return number(value), None

    labelled = _LABELLED.findall(answer)
    if labelled:
        return out_of(*labelled[-1])
    fractions = _OUT_OF.findall(answer)
    of_high = [(value, maximum) for value, maximum in fractions if number(maximum) == high]
    if len(of_high) == 1:
        return out_of(*of_high[0])
    numbers = NUMBER.findall(answer)
    if len(numbers) == 1:
        return number(numbers[0]), None
    if fractions and not of_high:
        return out_of(*fractions[-1])
    if not numbers:
        return 0.0, f"the judge's answer states no score: {answer!r}"
    return 0.0, (f"the judge's answer holds {len(numbers)} numbers and no labelled score (\"Score: x\" or one "
                 f"\"x/{high:g}\"): {answer!r}")


def _message(spec: Spec, index: int, message: Any) -> tuple[str, Template]:
    key = f"input.{index}"
    if not isinstance(message, dict) or set(message) != {"role", "content"} or not isinstance(message["content"], str):
        raise spec.error(f"message {index} must be a mapping with exactly `role` and `content` (text)", key)
    if message["role"] not in ("system", "user", "assistant"):
        raise spec.error(f"message {index}: role {message['role']!r} is not system, user or assistant", key)
    return message["role"], Template(message["content"], spec, key)
