"""Statistics of paired scores: Wilson intervals, the exact McNemar test, the paired test of a mean difference
with its bootstrap interval, and the base-vs-tuned MMLU comparison.

scipy (a dependency of mlflow, great_expectations and datasketch) is imported inside the functions that
use it, so the package still imports on a box with only the training stack.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import pandas as pd

Z95 = 1.959963984540054
# The paired bootstrap and the permutation test draw from a generator with this seed: same rows, same numbers.
DEFAULT_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
PERMUTATION_RESAMPLES = 9_999


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval of a binomial proportion (sound at small n and near 0 or 1)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds at 0 and n successes are exactly 0 and 1; rounding would leave 1e-18 there.
    return (0.0 if successes <= 0 else max(0.0, center - half)), (1.0 if successes >= n else min(1.0, center + half))


def _binomial_upper_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2), exactly."""
    return sum(math.comb(m, j) for j in range(k, m + 1)) / 2 ** m


def mcnemar_exact(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact (binomial) McNemar test on paired right/wrong outcomes of the same questions.

    b = right before, wrong after; c = wrong before, right after. Under "no change", b given
    b + c is Binomial(b + c, 1/2): the two-sided p-value is min(1, 2 P(X <= min(b, c))); the one-sided
    p-values are P(X >= c) for "tuned is better" and P(X >= b) for "tuned is worse" (1 when b + c = 0).
    Also the paired 95% CI of the accuracy delta (c - b) / n (normal approximation).
    """
    pairs = list(zip((bool(x) for x in base_correct), (bool(x) for x in tuned_correct)))
    n = len(pairs)
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    m = b + c
    if m == 0:
        p_value = better = worse = 1.0
    else:
        p_value = min(1.0, 2 * _binomial_upper_tail(m - min(b, c), m))  # P(X <= k) = P(X >= m - k)
        better, worse = _binomial_upper_tail(c, m), _binomial_upper_tail(b, m)
    delta = (c - b) / n if n else None
    if n:
        var = max(0.0, (b + c) / n - ((c - b) / n) ** 2) / n
        half = Z95 * math.sqrt(var)
        delta_ci = [delta - half, delta + half]
    else:
        delta_ci = None
    return {"n": n, "base_only_correct": b, "tuned_only_correct": c, "p_value": p_value,
            "p_value_tuned_better": better, "p_value_tuned_worse": worse,
            "delta": delta, "delta_ci": delta_ci, "test": "McNemar exact (two-sided binomial)"}


def _seeded(function, seed: int) -> dict[str, Any]:
    """The keyword that seeds a scipy resampling function (`rng` since scipy 1.15, `random_state` before)."""
    import numpy as np

    name = "rng" if "rng" in inspect.signature(function).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def bootstrap_mean_interval(values: Sequence[float], seed: int = DEFAULT_SEED, n_resamples: int = BOOTSTRAP_RESAMPLES,
                            confidence: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean (`scipy.stats.bootstrap`, rows resampled with replacement,
    a generator seeded with `seed`). For paired scores pass the per-row differences: the pairs stay together.
    Constant values give the degenerate interval [value, value]; no values give None."""
    import numpy as np
    from scipy import stats

    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return None
    if np.all(data == data[0]):
        return [float(data[0]), float(data[0])]
    result = stats.bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                             vectorized=True, **_seeded(stats.bootstrap, seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def _binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def paired_difference_test(base: Sequence[float], tuned: Sequence[float], seed: int = DEFAULT_SEED,
                           n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Tuned minus base on the same rows: the effect, its 95% interval and a paired test of "no difference".

    * effect = mean over rows of (tuned_i - base_i); effect_ci: paired percentile bootstrap of that mean
      (`bootstrap_mean_interval` of the differences, `seed`, `n_resamples`);
    * binary scores (every value 0 or 1): the exact McNemar test (`mcnemar_exact`);
    * other scores: a paired sign-flip permutation test of the mean difference
      (`scipy.stats.permutation_test`, permutation_type="samples": each row's difference keeps or flips
      its sign; exact when 2^n <= 9,999 sign patterns, else 9,999 random ones from the same seed);
    * p_value is two-sided; p_value_tuned_better / p_value_tuned_worse are the one-sided p-values;
    * base, tuned: the means, with 95% intervals (Wilson for binary scores, percentile bootstrap otherwise).
    """
    import numpy as np

    base = [float(v) for v in base]
    tuned = [float(v) for v in tuned]
    if len(base) != len(tuned):
        raise ValueError(f"paired scores need the same rows: {len(base)} base, {len(tuned)} tuned")
    n = len(base)
    out: dict[str, Any] = {"n": n, "base": None, "tuned": None, "base_ci": None, "tuned_ci": None, "effect": None,
                           "effect_ci": None, "p_value": None, "p_value_tuned_better": None, "p_value_tuned_worse": None,
                           "ci_method": f"paired percentile bootstrap, {n_resamples} resamples, seed {seed}"}
    if n == 0:
        out["test"] = None
        return out
    binary = _binary(base) and _binary(tuned)
    diffs = [t - b for b, t in zip(base, tuned)]
    out.update(base=sum(base) / n, tuned=sum(tuned) / n, effect=sum(diffs) / n,
               effect_ci=bootstrap_mean_interval(diffs, seed=seed, n_resamples=n_resamples))
    if binary:
        mc = mcnemar_exact([v == 1.0 for v in base], [v == 1.0 for v in tuned])
        out.update(test="McNemar exact", p_value=mc["p_value"], p_value_tuned_better=mc["p_value_tuned_better"],
                   p_value_tuned_worse=mc["p_value_tuned_worse"], base_only_correct=mc["base_only_correct"],
                   tuned_only_correct=mc["tuned_only_correct"])
        out["base_ci"] = list(wilson_interval(int(sum(base)), n))
        out["tuned_ci"] = list(wilson_interval(int(sum(tuned)), n))
        return out
    out["base_ci"] = bootstrap_mean_interval(base, seed=seed, n_resamples=n_resamples)
    out["tuned_ci"] = bootstrap_mean_interval(tuned, seed=seed, n_resamples=n_resamples)
    out["test"] = "paired sign-flip permutation test of the mean difference"
    data = np.asarray(diffs)
    if np.all(data == 0):
        out.update(p_value=1.0, p_value_tuned_better=1.0, p_value_tuned_worse=1.0)
        return out
    if n == 1:  # the two sign patterns of one difference d != 0: +d and -d (scipy wants two rows)
        better = 0.5 if data[0] > 0 else 1.0
        out.update(p_value=1.0, p_value_tuned_better=better, p_value_tuned_worse=1.5 - better)
        return out
    from scipy import stats

    for key, alternative in (("p_value", "two-sided"), ("p_value_tuned_better", "greater"), ("p_value_tuned_worse", "less")):
        result = stats.permutation_test((data,), np.mean, permutation_type="samples", vectorized=True,
                                        n_resamples=PERMUTATION_RESAMPLES, alternative=alternative,
                                        **_seeded(stats.permutation_test, seed))
        out[key] = min(1.0, float(result.pvalue))
    return out


def compare_evaluations(
    base_summary: dict[str, Any],
    tuned_summary: dict[str, Any],
    base_predictions: pd.DataFrame | None = None,
    tuned_predictions: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Tuned minus base: overall, macro, per-subject and per-category accuracy deltas.

    With both prediction tables, also `paired`: `paired_difference_test` of right/wrong on the questions both
    scored (exact McNemar p-values, two-sided and one-sided; the accuracy delta with its paired bootstrap 95%
    interval as `delta`, `delta_ci`); the deltas themselves come from the summaries.
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
        paired = paired_difference_test([float(bool(v)) for v in joined["correct_base"]],
                                        [float(bool(v)) for v in joined["correct_tuned"]])
        # `delta`/`delta_ci`: the names this comparison has always used for the effect and its interval.
        out["paired"] = {**paired, "delta": paired["effect"], "delta_ci": paired["effect_ci"],
                         "base_only_correct": paired.get("base_only_correct", 0), "tuned_only_correct": paired.get("tuned_only_correct", 0)}
        out["paired"]["unmatched_questions"] = int(len(base_predictions) + len(tuned_predictions) - 2 * len(joined))
    return out
