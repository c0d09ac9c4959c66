"""Wilson intervals, the exact McNemar test and the base-vs-tuned comparison."""

import pandas as pd
import pytest

from sft_pipeline.evaluation.statistics import compare_evaluations, mcnemar_exact, wilson_interval


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


def test_compare_with_predictions_adds_the_paired_test():
    base = pd.DataFrame({"question_id": list("abcd"), "correct": [True, True, False, False]})
    tuned = pd.DataFrame({"question_id": list("dcba"), "correct": [True, True, True, False]})  # a wrong, c and d right
    s_base, s_tuned = ({"accuracy": float(f["correct"].mean())} for f in (base, tuned))
    paired = compare_evaluations(s_base, s_tuned, base, tuned)["paired"]
    assert (paired["base_only_correct"], paired["tuned_only_correct"]) == (1, 2)
    assert paired["unmatched_questions"] == 0 and paired["p_value"] == 1.0
