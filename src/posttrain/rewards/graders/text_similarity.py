"""`text_similarity`: partial credit in [0, 1] from a text-overlap metric between the rendered input and
reference, computed by maintained libraries (not re-implemented here):

    fuzzy_match   rapidfuzz.fuzz.ratio / 100 (normalised Indel similarity)
    bleu          sacrebleu sentence BLEU / 100 (with exponential smoothing, the sacrebleu default)
    gleu          nltk's sentence GLEU (Google-BLEU) on whitespace tokens
    rouge_1..5    rouge-score ROUGE-N F-measure (Porter stemming off), on words of any script
    rouge_l       rouge-score ROUGE-L F-measure, likewise

With `pass_threshold` the score becomes 1 at or above the threshold and 0 below (pass/fail).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from posttrain.rewards.graders.base import GradeResult, Item, Sample, Spec
from posttrain.rewards.graders.template import template_field


def _fuzzy(text: str, ref: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(text, ref) / 100.0


def _bleu(text: str, ref: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(text, [ref]).score / 100.0


def _gleu(text: str, ref: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([ref.split()], text.split()))


# rouge-score's own tokenizer keeps only [a-z0-9] and scored two identical Japanese or Russian texts 0. Words here are
# runs of letters and digits of any script (the same words as rouge-score's for ASCII text), and each Han, kana or
# Hangul character is a word of its own, as those scripts write no spaces between words.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_ROUGE_WORD = re.compile(rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+")


class _RougeWords:
    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_WORD.findall(text.lower())


def _rouge(kind: str) -> Callable[[str, str], float]:
    def score(text: str, ref: str) -> float:
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer([kind], tokenizer=_RougeWords()).score(ref, text)[kind].fmeasure

    return score


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": _fuzzy, "bleu": _bleu, "gleu": _gleu,
    **{f"rouge_{n}": _rouge(f"rouge{n}") for n in range(1, 6)}, "rouge_l": _rouge("rougeL"),
}


class TextSimilarityGrader:
    def __init__(self, spec: Spec) -> None:
        spec.only("type", "name", "input", "reference", "evaluation_metric", "pass_threshold")
        self.name = spec.get("name", str, "text_similarity")
        self.input, self.reference = template_field(spec, "input"), template_field(spec, "reference")
        self.metric = METRICS[spec.get("evaluation_metric", str, choices=tuple(METRICS))]
        # Without a threshold the similarity is the (partial) credit; with one, 1 at or above it and 0 below.
        self.pass_threshold = spec.get("pass_threshold", (int, float), None)

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        scores = [min(1.0, max(0.0, self.metric(self.input.render(s, i), self.reference.render(s, i))))
                  for s, i in zip(samples, items, strict=True)]
        if self.pass_threshold is not None:
            scores = [float(score >= self.pass_threshold) for score in scores]
        return GradeResult(scores)
