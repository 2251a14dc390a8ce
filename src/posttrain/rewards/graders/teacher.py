"""`teacher`: the reward of an RLT-style teacher (Cetin et al. 2025, "Reinforcement Learning Teachers").

The teacher sees the question *and* the answer and writes an explanation (the sample). A good
explanation makes a student model, which sees only the question and the explanation, confident in the
correct answer, without being something the student finds implausible given the question alone:

    answer_logp   = mean over answer tokens a_t of log p_student(a_t | question, explanation, a_<t)
    explain_logp  = mean over explanation tokens e_t of log p_student(e_t | question, e_<t)
    score         = exp(answer_logp + penalty * explain_logp)            in (0, 1]

i.e. log score = answer_logp - penalty * (the student's per-token surprise at the explanation): the
paper's "solution understanding" term minus its "explanation plausibility" term, in the log domain so
the score stays a partial credit in [0, 1]. (The paper's penalty is a KL between teacher and student
over the explanation; with only the student at hand, its cross-entropy is the per-sample estimate.)

The student reads `{question}` as the user turn and `{explanation}{separator}{answer}` as its answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.rewards.graders.base import GradeResult, Item, Sample, Spec
from posttrain.rewards.graders.template import template_field


class TeacherGrader:
    def __init__(self, spec: Spec) -> None:
        spec.only("type", "name", "student", "question", "explanation", "answer", "separator", "penalty")
        self.name = spec.get("name", str, "teacher")
        self.student_path = Path(spec.get("student", str))
        if not (self.student_path / "config.json").is_file():
            raise spec.error(f"no model directory at {self.student_path} (config.json missing)", "student")
        self.question, self.answer = template_field(spec, "question"), template_field(spec, "answer")
        self.explanation = (template_field(spec, "explanation") if "explanation" in spec.data
                            else template_field(Spec({"explanation": "{{ sample.output_text }}"}), "explanation"))
        self.separator = spec.get("separator", str, "\nAnswer: ")
        self.penalty = float(spec.get("penalty", (int, float), 0.1))
        if self.penalty < 0:
            raise spec.error("must be >= 0", "penalty")
        self._student: Any = None

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        scores, errors = [], []
        for sample, item in zip(samples, items, strict=True):
            answer_logp, explain_logp = self.student_logprobs(
                self.question.render(sample, item), self.explanation.render(sample, item),
                self.answer.render(sample, item))
            total = answer_logp + self.penalty * explain_logp
            if math.isfinite(total) or total == -math.inf:  # -inf: the student gives the answer no chance (0)
                scores.append(math.exp(min(0.0, total)))
                errors.append(None)
            else:  # NaN (a diverged student): exp(min(0, nan)) would be full credit
                scores.append(0.0)
                errors.append(f"the student's log-likelihood is {total}, not a number")
        return GradeResult(scores, errors=errors)

    def student_logprobs(self, question: str, explanation: str, answer: str) -> tuple[float, float]:
        """(mean logprob of the answer tokens, mean logprob of the explanation tokens) under the student."""
        import torch

        from posttrain.algos import token_logprobs
        from posttrain.models.device import model_device

        encoder, model = self._load()
        prompt = encoder.encode_prompt([{"role": "user", "content": question, "reasoning": None}])
        explain, target = self._split_tokens(encoder.tokenizer, explanation + self.separator, answer)
        ids = torch.tensor([prompt + explain + target], device=model_device(model))
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        logprobs = token_logprobs(logits, ids[:, 1:])[0]
        start = len(prompt) - 1  # logits at t predict token t + 1
        explain_part = logprobs[start:start + len(explain)]
        answer_part = logprobs[start + len(explain):]
        return (answer_part.mean().item() if len(target) else 0.0,
                explain_part.mean().item() if len(explain) else 0.0)

    @staticmethod
    def _split_tokens(tokenizer, before: str, answer: str) -> tuple[list[int], list[int]]:
        """The tokens of `before + answer` as the student reads the text whole, cut where the answer begins: a token
        holding a character of the answer is the answer's (the separator's trailing space joins the answer's first
        word, "Ġseven"; the two tokenised apart, " " and "seven", are a sequence the student never sees). Without
        character offsets (a slow tokenizer), the two parts tokenised apart."""
        if not getattr(tokenizer, "is_fast", False):
            return (tokenizer.encode(before, add_special_tokens=False),
                    tokenizer.encode(answer, add_special_tokens=False))
        encoded = tokenizer(before + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        cut = next((i for i, (_, end) in enumerate(offsets) if end > len(before)), len(ids))
        return ids[:cut], ids[cut:]

    def _load(self):
        if self._student is None:
            from posttrain.data.config import DataConfig
            from posttrain.data.tokenize import Encoder
            from posttrain.models import load_causal_lm, load_tokenizer

            tokenizer = load_tokenizer(self.student_path)
            self._student = (Encoder.from_config(tokenizer, DataConfig(truncation="truncate_left")),
                             load_causal_lm(self.student_path).eval())
        return self._student
