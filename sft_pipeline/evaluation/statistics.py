"""Statistics of accuracy: Wilson intervals, the exact McNemar test, and the paired base-vs-tuned comparison."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval of a binomial proportion (sound at small n and near 0 or 1)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact (binomial) McNemar test on paired right/wrong outcomes of the same questions.

    b = right before, wrong after; c = wrong before, right after. Under "no change", b given
    b + c is Binomial(b + c, 1/2); the two-sided p-value is min(1, 2 P(X <= min(b, c))).
    Also the paired 95% CI of the accuracy delta (c - b) / n (normal approximation).
    """
    pairs = list(zip((bool(x) for x in base_correct), (bool(x) for x in tuned_correct)))
    n = len(pairs)
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    m = b + c
    if m == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2 ** m
        p_value = min(1.0, 2 * tail)
    delta = (c - b) / n if n else None
    if n:
        var = max(0.0, (b + c) / n - ((c - b) / n) ** 2) / n
        half = 1.959963984540054 * math.sqrt(var)
        delta_ci = [delta - half, delta + half]
    else:
        delta_ci = None
    return {"n": n, "base_only_correct": b, "tuned_only_correct": c, "p_value": p_value,
            "delta": delta, "delta_ci": delta_ci, "test": "McNemar exact (two-sided binomial)"}


def compare_evaluations(
    base_summary: dict[str, Any],
    tuned_summary: dict[str, Any],
    base_predictions: pd.DataFrame | None = None,
    tuned_predictions: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Tuned minus base: overall, macro, per-subject and per-category accuracy deltas.

    With both prediction tables, also the paired McNemar test on the questions both scored
    (`paired`); the deltas themselves come from the summaries.
    """

    def delta(a, b):
        return None if a is None or b is None else float(b) - float(a)

    def grouped(key):
        base, tuned = base_summary.get(key) or {}, tuned_summary.get(key) or {}
        return {
            name: {
                "base": base[name]["accuracy"],
                "tuned": tuned[name]["accuracy"],
                "delta": delta(base[name]["accuracy"], tuned[name]["accuracy"]),
                "n": tuned[name].get("n"),
            }
            for name in sorted(set(base) & set(tuned))
        }

    base_subjects = set(base_summary.get("per_subject") or {})
    tuned_subjects = set(tuned_summary.get("per_subject") or {})
    out = {
        "base_accuracy": base_summary.get("accuracy"),
        "tuned_accuracy": tuned_summary.get("accuracy"),
        "accuracy_delta": delta(base_summary.get("accuracy"), tuned_summary.get("accuracy")),
        "macro_accuracy_delta": delta(base_summary.get("macro_accuracy"), tuned_summary.get("macro_accuracy")),
        "per_subject": grouped("per_subject"),
        "per_category": grouped("per_category"),
        # Subjects scored on one side only: their deltas would compare different questions.
        "unmatched_subjects": sorted(base_subjects ^ tuned_subjects),
    }
    if base_predictions is not None and tuned_predictions is not None:
        joined = base_predictions[["question_id", "correct"]].merge(
            tuned_predictions[["question_id", "correct"]], on="question_id", suffixes=("_base", "_tuned")
        )
        out["paired"] = mcnemar_exact(joined["correct_base"], joined["correct_tuned"])
        out["paired"]["unmatched_questions"] = int(len(base_predictions) + len(tuned_predictions) - 2 * len(joined))
    return out
