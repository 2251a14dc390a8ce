"""`multi`: several graders combined by a formula over their names, e.g. `0.8 * exact + 0.2 * close`.

The formula is parsed with `ast` and evaluated by walking a whitelist: numbers, grader names, + - * /
** and unary minus, and the functions min, max, abs, sqrt, exp, log, floor, ceil. Anything else (an
attribute, a subscript, a comprehension, a call of any other name, a lambda) is refused when the grader
is built, as is a function given too few or too many arguments; Python's `eval` is never called. A sample
whose formula fails (division by zero) or leaves [0, 1], or one of whose inner graders erred, scores 0 with an
error; each inner grader's score is logged under its name.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence

from posttrain.rewards.graders.base import Grader, GradeResult, Item, Sample, Spec, checked_score

BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow}
UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs, "sqrt": math.sqrt,
                                              "exp": math.exp, "log": math.log, "floor": math.floor,
                                              "ceil": math.ceil}
# How many arguments each function takes (fewest, most; None: any number): `max(exact)` fails on every sample.
ARITY: dict[str, tuple[int, int | None]] = {"min": (2, None), "max": (2, None), "log": (1, 2)}


class Formula:
    """An arithmetic expression over named values, checked once and evaluated without `eval`."""

    def __init__(self, text: str, names: Sequence[str]) -> None:
        self.text, self.names = text, frozenset(names)
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as err:
            raise ValueError(f"does not parse: {err.msg}") from None
        self._check(self.tree)

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise ValueError(f"{node.id!r} is not a grader of this multi grader ({', '.join(sorted(self.names))})")
            return
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            self._check(node.left)
            self._check(node.right)
            return
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            self._check(node.operand)
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
                and node.func.id not in self.names and not node.keywords):
            fewest, most = ARITY.get(node.func.id, (1, 1))
            if len(node.args) < fewest or (most is not None and len(node.args) > most):
                wanted = (f"{fewest} or more" if most is None else f"{fewest}" if fewest == most
                          else f"{fewest} to {most}")
                raise ValueError(f"{ast.unparse(node)!r}: {node.func.id} takes {wanted} arguments, "
                                 f"got {len(node.args)}")
            for arg in node.args:
                self._check(arg)
            return
        raise ValueError(f"{ast.unparse(node)!r} is not allowed: only numbers, grader names, + - * / **, "
                         f"and {', '.join(FUNCTIONS)}")

    def __call__(self, values: Mapping[str, float]) -> float:
        return self._eval(self.tree, values)

    def _eval(self, node: ast.AST, values: Mapping[str, float]) -> float:
        # Floats throughout: Python's integers have no bound, and `0 * 9 ** 9 ** 9` (or floor(9) ** ...) computed
        # a number of millions of digits in the trainer's process, with no timeout; a float overflows with an error.
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.BinOp):
            return BINARY[type(node.op)](self._eval(node.left, values), self._eval(node.right, values))
        if isinstance(node, ast.UnaryOp):
            return UNARY[type(node.op)](self._eval(node.operand, values))
        return float(FUNCTIONS[node.func.id](*(self._eval(arg, values) for arg in node.args)))


class MultiGrader:
    def __init__(self, spec: Spec, build: Callable[[Spec], Grader]) -> None:
        spec.only("type", "name", "graders", "calculate_output")
        self.name = spec.get("name", str, "multi")
        inner = spec.child("graders")
        if not inner.data:
            raise spec.error("needs at least one grader", "graders")
        self.graders = {name: build(inner.child(name)) for name in inner.data}
        try:
            self.formula = Formula(spec.get("calculate_output", str), list(self.graders))
        except ValueError as err:
            raise spec.error(str(err), "calculate_output") from None

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> GradeResult:
        results = {name: grader.grade(samples, items) for name, grader in self.graders.items()}
        scores, errors, components = [], [], {}
        for name, result in results.items():
            components[name] = result.scores
            components.update({f"{name}.{sub}": values for sub, values in result.components.items()})
        for i in range(len(samples)):
            inner_errors = [f"{name}: {r.errors[i]}" for name, r in results.items() if r.errors[i] is not None]
            if inner_errors:  # an inner grader that failed fails the row: its 0 is no score for the formula
                scores.append(0.0)
                errors.append("; ".join(inner_errors))
                continue
            try:
                score, error = checked_score(self.formula({name: r.scores[i] for name, r in results.items()}))
            except (ArithmeticError, ValueError) as err:
                score, error = 0.0, f"calculate_output failed: {type(err).__name__}: {err}"
            errors.append(error)
            scores.append(score)
        return GradeResult(scores, components, errors)
