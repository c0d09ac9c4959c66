"""The promotion rule: a significant held-out improvement, the forgetting guard, and the evidence each criterion needs."""

import math

import pandas as pd
import pytest

from sft_pipeline.evaluation.gate import GateSettings, evaluate_gate, gate_verdict
from sft_pipeline.evaluation.heldout import heldout_loss
from sft_pipeline.evaluation.statistics import paired_difference_test

NAN = float("nan")


def _mmlu(base_right: int, tuned_right: int, newly_wrong: int = 0, n: int = 40) -> dict:
    """An MMLU comparison with the paired test, as `compare_evaluations` builds it from per-question predictions."""
    base = [1.0] * base_right + [0.0] * (n - base_right)
    tuned = base.copy()
    for i in range(newly_wrong):
        tuned[i] = 0.0
    gained = tuned_right - (base_right - newly_wrong)
    for i in range(base_right, base_right + gained):
        tuned[i] = 1.0
    paired = paired_difference_test(base, tuned)
    return {"base_accuracy": base_right / n, "tuned_accuracy": tuned_right / n, "accuracy_delta": (tuned_right - base_right) / n,
            "paired": {**paired, "delta": paired["effect"], "delta_ci": paired["effect_ci"]}}


def _task(base_scores, tuned_scores, metric="exact_match") -> dict:
    """A held-out comparison with the paired test of `metric`, as `compare_task_metrics` builds it."""
    paired = {"metric": metric, **paired_difference_test(base_scores, tuned_scores)}
    rows = len(base_scores)
    return {"base": {"rows": rows, "structured_rows": rows, metric: paired["base"]},
            "tuned": {"rows": rows, "structured_rows": rows, metric: paired["tuned"]},
            "delta": {metric: paired["effect"]}, "paired": {metric: paired}, "primary_metric": metric, "primary": paired}


# What the demo measures: 4 subjects x 10 MMLU questions, ~100 held-out ticket rows.
DEMO_MMLU = _mmlu(12, 12)
DEMO_TEST = {"loss": 1.0, "num_rows": 100, "num_tokens": 3000}
WIN = _task([1.0] * 5 + [0.0] * 95, [1.0] * 70 + [0.0] * 30)  # 0.05 -> 0.70 exact match
NO_CHANGE = _task([1.0] * 50 + [0.0] * 50, [1.0] * 50 + [0.0] * 50)


def test_a_significant_held_out_gain_passes_with_its_numbers_in_the_verdict():
    gate = evaluate_gate(DEMO_MMLU, DEMO_TEST, {**DEMO_TEST, "loss": 0.6}, GateSettings(), WIN)
    assert gate["passed"] is True and gate["reasons"] == []
    assert gate["primary_metric"] == "exact_match" and gate["alpha"] == 0.05
    task = gate["task"]
    assert task["passed"] is True and task["test"] == "McNemar exact" and task["n"] == 100
    assert task["effect"] == pytest.approx(0.65) and task["p_value"] < 1e-15
    assert task["effect_ci"][0] > 0.5 and task["effect_ci"][1] < 0.8
    assert (task["base_only_correct"], task["tuned_only_correct"]) == (0, 65)
    assert gate["mmlu"]["passed"] is True and gate["mmlu"]["n"] == 40 and gate["mmlu"]["p_value"] == 1.0
    assert gate["test_loss"] == {"base": 1.0, "tuned": 0.6, "increase": pytest.approx(-0.4), "n": 100, "max_increase": 0.0,
                                 "min_rows": 10, "passed": True}
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(), WIN) == (True, [])


def test_a_gain_that_could_be_noise_fails_and_says_why():
    # 3 more right answers out of 100 (5 changed answers, 4 of them for the better): p = 0.375.
    noise = _task([1.0] * 50 + [0.0] * 50, [0.0] + [1.0] * 49 + [1.0] * 4 + [0.0] * 46)
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(), noise)
    assert not passed and len(reasons) == 1
    assert reasons[0].startswith("held-out exact_match did not improve significantly: base 0.500 -> tuned 0.530, effect +0.030 (95% CI [")
    assert reasons[0].endswith("McNemar exact p=0.375 (two-sided), not below alpha 0.05 (n=100)")
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(), NO_CHANGE)
    assert not passed and reasons[0].startswith("held-out exact_match did not improve: base 0.500 -> tuned 0.500, effect +0.000")
    # The same small gain passes at a looser alpha; a required minimum effect fails it again.
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(alpha=0.5), noise) == (True, [])
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(alpha=0.5, min_task_improvement=0.1), noise)
    assert reasons == ["held-out exact_match improved by +0.030, less than the required +0.100 (min_task_improvement)"]


def test_a_fractional_primary_metric_is_tested_by_permutation():
    base = [0.0, 0.5] * 30
    tuned = [1.0, 1.0] * 25 + [0.5, 0.5] * 5
    gate = evaluate_gate(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(primary_metric="field_accuracy"), _task(base, tuned, "field_accuracy"))
    assert gate["passed"] is True and gate["task"]["metric"] == "field_accuracy"
    assert gate["task"]["test"] == "paired sign-flip permutation test of the mean difference"
    assert gate["task"]["p_value"] == pytest.approx(2 / 10_000)  # every one of 9,999 random sign patterns is below the observed mean
    # The task comparison has no row with the primary metric: a missing measurement, which fails.
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, GateSettings(primary_metric="rouge_l"), WIN)
    assert not passed and reasons == [
        "held-out rouge_l is missing: no held-out row both models answered has it (rouge_l is measured on generative rows; "
        "the answered rows were 100 structured, 0 classification, 0 generative); choose another primary_metric or set "
        "min_task_improvement to null"]


def test_the_forgetting_guard_fails_on_a_significant_or_a_large_mmlu_drop():
    settings = GateSettings()
    # 1,000 questions, 3 points lower (40 answers went wrong, 10 right): within max_mmlu_drop, but significant.
    significant = _mmlu(500, 470, newly_wrong=40, n=1000)
    gate = evaluate_gate(significant, DEMO_TEST, DEMO_TEST, settings, WIN)
    assert not gate["passed"] and gate["mmlu"]["passed"] is False and gate["task"]["passed"] is True
    assert gate["mmlu"]["p_value"] == pytest.approx(1.193e-5, rel=1e-3) and (gate["mmlu"]["newly_wrong"], gate["mmlu"]["newly_right"]) == (40, 10)
    assert len(gate["reasons"]) == 1 and gate["reasons"][0].startswith(
        "MMLU accuracy is significantly lower: base 0.500 -> tuned 0.470 (delta -0.030, 95% CI [")
    assert "one-sided McNemar p=" in gate["reasons"][0] and gate["reasons"][0].endswith("(n=1000, 40 newly wrong, 10 newly right)")
    # 40 questions, 4 answers lost: not significant (p = 0.0625), but more than the allowed 0.05 drop.
    large = _mmlu(20, 16, newly_wrong=4)
    passed, reasons = gate_verdict(large, DEMO_TEST, DEMO_TEST, settings, WIN)
    assert not passed and reasons == ["MMLU accuracy fell by 0.100, more than the allowed 0.050 (one-sided McNemar p=0.0625, "
                                      "n=40, 4 newly wrong, 0 newly right)"]
    # A drop of 1 question is neither: passes.
    assert gate_verdict(_mmlu(20, 19, newly_wrong=1), DEMO_TEST, DEMO_TEST, settings, WIN) == (True, [])
    # Without the per-question pairs a significant drop cannot be ruled out.
    unpaired = {k: v for k, v in DEMO_MMLU.items() if k != "paired"}
    passed, reasons = gate_verdict(unpaired, DEMO_TEST, DEMO_TEST, settings, WIN, mmlu_questions=40)
    assert reasons == ["MMLU paired test is missing: without both models' per-question predictions a significant drop "
                       "cannot be ruled out"]


def test_test_loss_threshold():
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, {**DEMO_TEST, "loss": 1.2}, GateSettings(), WIN)
    assert reasons == ["held-out test loss rose from 1.0000 to 1.2000, more than the allowed 0.0000"]
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, {**DEMO_TEST, "loss": 1.05}, GateSettings(max_test_loss_increase=0.1), WIN) == (True, [])
    # A loss of exactly 0 is a measurement, not a missing one.
    assert gate_verdict(DEMO_MMLU, {**DEMO_TEST, "loss": 0.0}, {**DEMO_TEST, "loss": 0.0}, GateSettings(), WIN) == (True, [])


def test_the_incident_an_empty_test_split_fails_the_gate():
    # 7 training rows, an empty test split, no generations: heldout_loss's answer for an empty split, no task.
    empty = {"loss": None, "perplexity": None, "num_tokens": 0}
    passed, reasons = gate_verdict({"accuracy_delta": None, "base_accuracy": 0.3, "tuned_accuracy": None, "paired": None},
                                   empty, empty, GateSettings(), None, mmlu_questions=0)
    assert not passed
    assert reasons == [
        "MMLU accuracy delta is missing (base accuracy 0.3, tuned accuracy None)",
        "MMLU questions scored by both models: 0, 30 fewer than the required 30 (min_mmlu_questions)",
        "MMLU paired test is missing: without both models' per-question predictions a significant drop cannot be ruled out",
        "held-out test loss of the base model is missing (no scored tokens: the test split is empty or has no assistant tokens)",
        "held-out test loss of the tuned model is missing (no scored tokens: the test split is empty or has no assistant tokens)",
        "held-out task score delta is missing: no generations were scored (generation_rows is -1 or the test split is empty); "
        "set min_task_improvement to null to gate without it",
    ]


@pytest.mark.parametrize("bad", [NAN, float("inf"), float("-inf")])
def test_non_finite_measurements_fail_instead_of_comparing_false(bad):
    settings = GateSettings()
    passed, reasons = gate_verdict({**DEMO_MMLU, "accuracy_delta": bad}, DEMO_TEST, DEMO_TEST, settings, WIN)
    assert not passed and reasons == [f"MMLU accuracy delta is {bad!r}, not a finite number (base accuracy 0.3, tuned accuracy 0.3)"]
    passed, reasons = gate_verdict(DEMO_MMLU, {**DEMO_TEST, "loss": bad}, {**DEMO_TEST, "loss": bad}, settings, WIN)
    assert not passed and len(reasons) == 2
    assert reasons[1] == f"held-out test loss of the tuned model is {bad!r}, not a finite number (100 test rows, 3000 scored tokens)"
    broken = {**WIN, "paired": {"exact_match": {**WIN["primary"], "effect": bad}}}
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, broken)
    assert not passed and reasons == [f"held-out exact_match effect (mean paired difference) is {bad!r}, not a finite number"]
    broken = {**WIN, "paired": {"exact_match": {**WIN["primary"], "p_value": bad}}}
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, broken)
    assert not passed and reasons == [f"held-out exact_match paired test p-value is {bad!r}, not a finite number"]
    broken = {**DEMO_MMLU, "paired": {**DEMO_MMLU["paired"], "p_value_tuned_worse": bad}}
    passed, reasons = gate_verdict(broken, DEMO_TEST, DEMO_TEST, settings, WIN)
    assert not passed and reasons[0].startswith(f"MMLU paired test is {bad!r}, not a finite number")


def test_too_little_evidence_fails_and_says_how_much_is_missing():
    settings = GateSettings(min_mmlu_questions=30, min_test_rows=10, min_generation_rows=10)
    few_questions = _mmlu(4, 4, n=12)
    few_rows = _task([0.0] * 3, [1.0] * 3)
    passed, reasons = gate_verdict(few_questions, {**DEMO_TEST, "num_rows": 7}, {**DEMO_TEST, "num_rows": 7}, settings, few_rows)
    assert not passed and reasons[:3] == [
        "MMLU questions scored by both models: 12, 18 fewer than the required 30 (min_mmlu_questions)",
        "held-out test rows the loss was computed on: 7, 3 fewer than the required 10 (min_test_rows)",
        "held-out rows with a paired exact_match: 3, 7 fewer than the required 10 (min_generation_rows)",
    ]
    # 3 rows cannot be significant either (p = 0.25): the test says so too.
    assert reasons[3].endswith("McNemar exact p=0.25 (two-sided), not below alpha 0.05 (n=3)") and len(reasons) == 4
    # An explicit count wins over the paired one; no count at all cannot be checked, so it fails too.
    assert gate_verdict(few_questions, DEMO_TEST, DEMO_TEST, settings, WIN, mmlu_questions=40) == (True, [])
    passed, reasons = gate_verdict({"accuracy_delta": 0.0, "paired": {"p_value_tuned_worse": 1.0}}, {"loss": 1.0}, {"loss": 1.0},
                                   settings, {**WIN, "paired": {"exact_match": {**WIN["primary"], "n": None}}})
    assert not passed and reasons[:2] == [
        "MMLU questions scored by both models: the count is unknown, so it cannot be checked against min_mmlu_questions=30",
        "held-out test rows the loss was computed on: the count is unknown, so it cannot be checked against min_test_rows=10",
    ]
    # Minimums of 0 switch the counting off, never the requirement that there is a measurement.
    none_needed = GateSettings(min_mmlu_questions=0, min_test_rows=0, min_generation_rows=0)
    assert gate_verdict(few_questions, {**DEMO_TEST, "num_rows": 1}, {**DEMO_TEST, "num_rows": 1}, none_needed,
                        _task([0.0] * 8, [1.0] * 8)) == (True, [])
    assert not gate_verdict(few_questions, {"loss": None}, {"loss": None}, none_needed, WIN)[0]


def test_without_a_task_minimum_the_task_metric_does_not_gate():
    settings = GateSettings(min_task_improvement=None)
    gate = evaluate_gate(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, None)
    assert (gate["passed"], gate["reasons"], gate["task"]["passed"], gate["task"]["gated"]) == (True, [], None, False)
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, NO_CHANGE) == (True, [])


@pytest.mark.parametrize("field, value", [("max_mmlu_drop", NAN), ("max_test_loss_increase", float("inf")),
                                          ("min_task_improvement", NAN), ("min_test_rows", -1), ("min_mmlu_questions", 2.5),
                                          ("min_generation_rows", True), ("alpha", NAN), ("alpha", 0.0), ("alpha", 1.0),
                                          ("primary_metric", "accuracy")])
def test_settings_reject_thresholds_that_would_wave_everything_through(field, value):
    with pytest.raises(ValueError, match=field):
        GateSettings(**{field: value})


def test_heldout_loss_counts_the_rows_it_scored(model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    rows = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([5, 6, 7], [-100, -100, -100]), ([9, 10, 11], [-100, 10, 11])]
    path = tmp_path / "test.parquet"
    pd.DataFrame({"input_ids": [r[0] for r in rows], "attention_mask": [[1] * len(r[0]) for r in rows],
                  "labels": [r[1] for r in rows]}).to_parquet(path)
    result = heldout_loss(model, path, batch_size=2)
    # The all-masked row contributes no token, so it is no evidence.
    assert result["num_rows"] == 2 and result["num_tokens"] == 4 and math.isfinite(result["loss"])


def test_an_unevaluated_model_never_passes_end_to_end(tiny_model_dir, questions, tmp_path):
    """The incident through `evaluate_tuned_model`: the same model as base and tuned (no change at all),
    an empty test split. It used to pass every gate and become champion."""
    from sft_pipeline.evaluation.scoring import score_multiple_choice, summarize_accuracy
    from sft_pipeline.evaluation.tuned import evaluate_tuned_model
    from sft_pipeline.modeling import load_model_for_eval

    empty = tmp_path / "test.parquet"
    pd.DataFrame({"id": pd.Series([], dtype=str), "messages": pd.Series([], dtype=object),
                  "input_ids": pd.Series([], dtype=object), "attention_mask": pd.Series([], dtype=object),
                  "labels": pd.Series([], dtype=object)}).to_parquet(empty)
    model, tokenizer = load_model_for_eval(tiny_model_dir, device="cpu")
    base_predictions = score_multiple_choice(model, tokenizer, questions, batch_size=4)
    del model
    result = evaluate_tuned_model(tiny_model_dir, {"model_dir": str(tiny_model_dir)}, questions, None, "plain",
                                  summarize_accuracy(base_predictions), base_predictions, empty, {}, GateSettings(), batch_size=4)
    assert result.gate["passed"] is False
    reasons = result.gate["reasons"]
    assert any(r.startswith(f"MMLU questions scored by both models: {len(questions)},") for r in reasons), reasons
    assert any(r.startswith("held-out test loss of the tuned model is missing") for r in reasons), reasons
    assert any(r.startswith("held-out task score delta is missing") for r in reasons), reasons
