"""Wilson intervals, the exact McNemar test, the paired test of a mean difference and the base-vs-tuned comparison."""

import itertools

import pandas as pd
import pytest

from sft_pipeline.evaluation.statistics import (
    bootstrap_mean_interval,
    compare_evaluations,
    mcnemar_exact,
    paired_difference_test,
    wilson_interval,
)


def test_compare_evaluations():
    base = {"accuracy": 0.5, "macro_accuracy": 0.4,
            "per_subject": {"a": {"accuracy": 0.5, "n": 4}, "b": {"accuracy": 0.25, "n": 4}},
            "per_category": {"STEM": {"accuracy": 0.5, "n": 8}}}
    tuned = {"accuracy": 0.625, "macro_accuracy": 0.5,
             "per_subject": {"a": {"accuracy": 0.75, "n": 4}, "c": {"accuracy": 1.0, "n": 1}},
             "per_category": {"STEM": {"accuracy": 0.625, "n": 8}}}
    cmp = compare_evaluations(base, tuned)
    assert cmp["accuracy_delta"] == pytest.approx(0.125)
    assert cmp["macro_accuracy_delta"] == pytest.approx(0.1)
    assert cmp["per_subject"] == {"a": {"base": 0.5, "tuned": 0.75, "delta": 0.25, "n": 4}}
    assert cmp["per_category"]["STEM"]["delta"] == pytest.approx(0.125)
    assert cmp["unmatched_subjects"] == ["b", "c"]


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == 1.0  # exact bounds, no 1e-18
    assert wilson_interval(0, 0) is None


def test_mcnemar_exact():
    base = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    tuned = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    result = mcnemar_exact(base, tuned)
    assert (result["base_only_correct"], result["tuned_only_correct"], result["n"]) == (10, 2, 20)
    assert result["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # scipy.stats.binomtest(2, 12).pvalue
    assert result["delta"] == pytest.approx(-0.4)
    assert result["delta_ci"][0] < -0.4 < result["delta_ci"][1]
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    assert result["p_value"] == pytest.approx(scipy_stats.binomtest(2, 12, 0.5).pvalue)
    # One-sided: 10 of the 12 changed answers went wrong.
    assert result["p_value_tuned_worse"] == pytest.approx(scipy_stats.binomtest(10, 12, 0.5, alternative="greater").pvalue)
    assert result["p_value_tuned_better"] == pytest.approx(scipy_stats.binomtest(2, 12, 0.5, alternative="greater").pvalue)
    assert result["p_value_tuned_worse"] == pytest.approx((1 + 12 + 66) / 4096)
    assert mcnemar_exact([True], [True])["p_value_tuned_worse"] == 1.0


def test_compare_with_predictions_adds_the_paired_test():
    base = pd.DataFrame({"question_id": list("abcd"), "correct": [True, True, False, False]})
    tuned = pd.DataFrame({"question_id": list("dcba"), "correct": [True, True, True, False]})  # a wrong, c and d right
    s_base, s_tuned = ({"accuracy": float(f["correct"].mean())} for f in (base, tuned))
    paired = compare_evaluations(s_base, s_tuned, base, tuned)["paired"]
    assert (paired["base_only_correct"], paired["tuned_only_correct"]) == (1, 2)
    assert paired["unmatched_questions"] == 0 and paired["p_value"] == 1.0
    assert paired["n"] == 4 and paired["delta"] == paired["effect"] == pytest.approx(0.25)
    assert paired["p_value_tuned_worse"] == pytest.approx(7 / 8)  # P(X >= 1), X ~ Binomial(3, 1/2)
    assert paired["delta_ci"][0] <= 0.25 <= paired["delta_ci"][1] and paired["test"] == "McNemar exact"


def test_binary_scores_get_the_exact_mcnemar_test_and_a_seeded_bootstrap_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    # 100 held-out rows: the base model gets 10 right, the tuned model 80; 2 rows went right -> wrong.
    base = [1.0] * 10 + [0.0] * 90
    tuned = [1.0] * 8 + [0.0] * 2 + [1.0] * 72 + [0.0] * 18
    result = paired_difference_test(base, tuned)
    assert result["test"] == "McNemar exact" and result["n"] == 100
    assert (result["base_only_correct"], result["tuned_only_correct"]) == (2, 72)
    assert result["base"] == pytest.approx(0.10) and result["tuned"] == pytest.approx(0.80) and result["effect"] == pytest.approx(0.70)
    assert result["p_value"] == pytest.approx(scipy_stats.binomtest(2, 74, 0.5).pvalue, rel=1e-9)
    assert result["p_value_tuned_better"] == pytest.approx(scipy_stats.binomtest(72, 74, 0.5, alternative="greater").pvalue, rel=1e-9)
    assert result["base_ci"] == pytest.approx(list(wilson_interval(10, 100))) and result["tuned_ci"] == pytest.approx(list(wilson_interval(80, 100)))
    low, high = result["effect_ci"]
    assert 0.55 < low < 0.70 < high < 0.85
    # The interval is the percentile bootstrap of the paired differences: the same numbers by hand.
    import numpy as np

    diffs = np.array(tuned) - np.array(base)
    manual = scipy_stats.bootstrap((diffs,), np.mean, method="percentile", n_resamples=10_000, rng=np.random.default_rng(0))
    assert [low, high] == pytest.approx([manual.confidence_interval.low, manual.confidence_interval.high])
    assert paired_difference_test(base, tuned) == result  # fixed seed: the same rows give the same numbers


def test_fractional_scores_get_an_exact_sign_flip_permutation_test():
    pytest.importorskip("scipy.stats")
    base = [0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.5, 0.0, 0.5, 0.0]
    tuned = [1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5]
    result = paired_difference_test(base, tuned)
    assert result["test"] == "paired sign-flip permutation test of the mean difference"
    # 2^10 sign patterns <= 9,999: scipy enumerates them all; enumerate them here too.
    diffs = [t - b for b, t in zip(base, tuned)]
    observed = sum(diffs) / len(diffs)
    means = [sum(s * d for s, d in zip(signs, diffs)) / len(diffs) for signs in itertools.product((1, -1), repeat=len(diffs))]
    greater = sum(m >= observed - 1e-12 for m in means) / len(means)
    less = sum(m <= observed + 1e-12 for m in means) / len(means)
    assert result["effect"] == pytest.approx(observed) == pytest.approx(0.45)
    assert result["p_value_tuned_better"] == pytest.approx(greater) and result["p_value_tuned_worse"] == pytest.approx(less)
    assert result["p_value"] == pytest.approx(min(1.0, 2 * min(greater, less)))
    assert result["p_value"] < 0.05
    assert result["effect_ci"][0] < observed < result["effect_ci"][1]
    assert result["base_ci"][0] <= result["base"] <= result["base_ci"][1]


def test_degenerate_paired_scores():
    nothing = paired_difference_test([], [])
    assert nothing["n"] == 0 and nothing["effect"] is None and nothing["p_value"] is None and nothing["effect_ci"] is None
    same = paired_difference_test([0.5, 1.0, 0.0], [0.5, 1.0, 0.0])
    assert same["effect"] == 0.0 and same["effect_ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    one = paired_difference_test([0.0], [0.5])
    assert one["p_value"] == 1.0 and one["p_value_tuned_better"] == 0.5 and one["effect_ci"] == [0.5, 0.5]
    assert bootstrap_mean_interval([]) is None and bootstrap_mean_interval([0.3] * 4) == [0.3, 0.3]
    with pytest.raises(ValueError, match="same rows"):
        paired_difference_test([1.0], [1.0, 0.0])
