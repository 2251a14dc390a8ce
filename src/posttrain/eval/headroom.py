"""Headroom: where a policy can still improve, per category of problem, and how much of it a stage captured.

    pass_at_k          the unbiased pass@k estimator of one problem (Chen et al. 2021)
    headroom           per category and for "all": greedy accuracy, sampled accuracy at T=1, pass@k and the share
                       of problems whose samples disagree (0 < p < 1)
    headroom_captured  (after - before) / (pass@k before - before)
    headroom_rows / headroom_lines   the report's table of those, before and after

Used by `posttrain eval` (built-in tasks and a user's `--data` file), by a run's held-out evaluation of a user's
file with a `category` column, and by the demo's report.
"""

from __future__ import annotations

import math
from typing import Any

OVERALL = "all"  # the row of every problem, beside one per category


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    1 - C(n-c, k) / C(n, k), as the running product prod_{i=n-c+1}^{n} (1 - k/i): exact in floating point
    even where the binomials overflow.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def headroom(categories: list[str | None], counts: list[int], n: int, ks: list[int],
             greedy: tuple[bool, ...] | None = None) -> dict[str, dict[str, float]]:
    """Where a policy can still improve, per category of problem and for "all": greedy accuracy (when measured),
    sampled accuracy at temperature 1 (the mean of c/n over problems: what RL's expected reward is), pass@k, and
    the share of problems with 0 < c < n (where a group of samples disagrees: a group baseline's signal). The
    gap from sampled accuracy to pass@k is what RL can reach by shifting mass onto answers the model already
    samples. Per problem: its category (None: counted in "all" only) and its correct samples, of n (n = 0: nothing
    was sampled, the greedy accuracy alone; n = 1: no share of disagreeing samples)."""
    members: dict[str, list[int]] = {OVERALL: list(range(len(categories)))}
    for category in sorted({c for c in categories if c is not None}):
        members[category] = [i for i, c in enumerate(categories) if c == category]
    table = {}
    for category, rows in members.items():
        mine = [counts[i] for i in rows]
        entry = {"problems": len(rows)}
        if greedy is not None:
            entry["accuracy"] = sum(greedy[i] for i in rows) / len(rows)
        if n:
            entry["sampled_accuracy"] = sum(mine) / (n * len(rows))
            entry |= {f"pass@{k}": sum(pass_at_k(n, c, k) for c in mine) / len(rows) for k in ks}
            if n > 1:  # one sample per problem cannot disagree with itself: the share is undefined, not 0
                entry["intermediate_share"] = sum(0 < c < n for c in mine) / len(rows)
        table[category] = entry
    return table


def headroom_captured(before: dict[str, float], after: dict[str, float], key: str, ceiling: str) -> float | None:
    """(after - before) / (ceiling_before - before) of one metric (`key`, e.g. sampled_accuracy) against the
    starting model's `ceiling` (e.g. pass@8): the share of the headroom a stage captured (None: no headroom)."""
    room = before.get(ceiling, 0.0) - before.get(key, 0.0)
    if key not in before or key not in after or room <= 0:
        return None
    return (after[key] - before[key]) / room


def headroom_rows(summaries: dict[str, dict[str, Any]], bases: dict[str, str | None]) -> list[dict[str, Any]]:
    """Per policy stage and category of problem: greedy and sampled accuracy, pass@k and the share of problems
    with 0 < p < 1 (`headroom`), with the share of its starting model's headroom the stage captured:
    (after - before) / (pass@k before - before), of the sampled and of the greedy accuracy."""
    rows = []
    for name, summary in summaries.items():
        table = summary.get("headroom")
        if not table:
            continue
        start = summaries.get(bases.get(name) or "", {}).get("headroom") or {}
        for category, after in table.items():
            before = start.get(category, {})
            ceiling = max((k for k in after if k.startswith("pass@")), key=lambda k: int(k[5:]), default=None)
            captured = {key: headroom_captured(before, after, key, ceiling) if ceiling and before else None
                        for key in ("sampled_accuracy", "accuracy")}
            rows.append({"stage": name, "category": category, "ceiling": ceiling, **after,
                         "captured_sampled": captured["sampled_accuracy"], "captured_greedy": captured["accuracy"]})
    return rows


def headroom_lines(rows: list[dict[str, Any]], first: str = "stage") -> list[str]:
    """The markdown section of `headroom_rows`, its first column (the stage, or before/after) headed `first`."""
    if not rows:
        return []
    lines = ["", "## Headroom per category", "",
             "Held-out problems per category: greedy and sampled (T=1) accuracy, pass@k from the same samples, the "
             "share of problems whose samples disagree (0 < p < 1: where a group baseline has signal), and the share "
             "of the starting model's headroom the stage captured, (after − before) / (pass@k before − before).", "",
             f"| {first} | category | problems | greedy | sampled | pass@k | 0 < p < 1 | captured (sampled) "
             "| captured (greedy) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['category']} | {r['problems']} | {_num(r.get('accuracy'), '{:.1%}')} | "
                     f"{r['sampled_accuracy']:.1%} | {_num(r.get(r['ceiling'] or ''), '{:.1%}')} | "
                     f"{_num(r.get('intermediate_share'), '{:.0%}')} | {_num(r['captured_sampled'], '{:+.0%}')} | "
                     f"{_num(r['captured_greedy'], '{:+.0%}')} |")
    return lines



def _num(value: Any, fmt: str) -> str:
    return "" if value is None else fmt.format(value)
