"""The promotion rule: thresholds, and the evidence each criterion needs before it may pass."""

import math

import pandas as pd
import pytest

from sft_pipeline.evaluation.gate import GateSettings, gate_verdict
from sft_pipeline.evaluation.heldout import heldout_loss

NAN = float("nan")
# What the embedded demo measures: 4 subjects x 10 MMLU questions, a held-out split of ~15 rows, as many generations.
DEMO_MMLU = {"accuracy_delta": 0.0, "base_accuracy": 0.3, "tuned_accuracy": 0.3, "paired": {"n": 40, "p_value": 1.0}}
DEMO_TEST = {"loss": 1.0, "num_rows": 15, "num_tokens": 900}


def _task(delta, rows=15):
    return {"base": {"rows": rows, "score": 0.5}, "tuned": {"rows": rows, "score": 0.5 + (delta or 0)}, "delta": {"score": delta}}


def test_thresholds_on_enough_evidence():
    settings = GateSettings()
    comparison = {**DEMO_MMLU, "accuracy_delta": -0.1, "paired": {"n": 40, "p_value": 0.02}}
    passed, reasons = gate_verdict(comparison, DEMO_TEST, {**DEMO_TEST, "loss": 0.9}, settings, _task(0.1))
    assert not passed and reasons == ["MMLU accuracy fell by 0.100, more than the allowed 0.050 (McNemar p=0.02)"]
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, {**DEMO_TEST, "loss": 1.2}, settings, _task(-0.2))
    assert not passed and reasons == ["held-out test loss rose from 1.0000 to 1.2000, more than the allowed 0.0000",
                                      "held-out task score changed by -0.200, less than the required +0.000"]
    # Within every allowance, on the demo's amounts of evidence: passes, so the defaults let the demo's numbers count.
    assert gate_verdict({**DEMO_MMLU, "accuracy_delta": -0.01}, DEMO_TEST, DEMO_TEST, settings, _task(0.0)) == (True, [])
    # A loss increase within the allowance passes; a task loss above a negative threshold passes too.
    loose = GateSettings(max_test_loss_increase=0.1, min_task_improvement=-0.1)
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, {**DEMO_TEST, "loss": 1.05}, loose, _task(-0.05)) == (True, [])
    # A loss of exactly 0 is a measurement, not a missing one.
    assert gate_verdict(DEMO_MMLU, {**DEMO_TEST, "loss": 0.0}, {**DEMO_TEST, "loss": 0.0}, settings, _task(0.0)) == (True, [])


def test_the_incident_an_empty_test_split_fails_the_gate():
    # 7 training rows, an empty test split, no generations: heldout_loss's answer for an empty split, no task.
    empty = {"loss": None, "perplexity": None, "num_tokens": 0}
    passed, reasons = gate_verdict({**DEMO_MMLU, "accuracy_delta": None, "tuned_accuracy": None, "paired": None},
                                   empty, empty, GateSettings(), None, mmlu_questions=0)
    assert not passed
    assert reasons == [
        "MMLU accuracy delta is missing (base accuracy 0.3, tuned accuracy None)",
        "MMLU questions scored by both models: 0, 30 fewer than the required 30 (min_mmlu_questions)",
        "held-out test loss of the base model is missing (no scored tokens: the test split is empty or has no assistant tokens)",
        "held-out test loss of the tuned model is missing (no scored tokens: the test split is empty or has no assistant tokens)",
        "held-out task score delta is missing: no generations were scored (generation_rows is 0 or the test split is empty); "
        "set min_task_improvement to null to gate without it",
    ]


@pytest.mark.parametrize("bad", [NAN, float("inf"), float("-inf")])
def test_non_finite_measurements_fail_instead_of_comparing_false(bad):
    settings = GateSettings()
    passed, reasons = gate_verdict({**DEMO_MMLU, "accuracy_delta": bad}, DEMO_TEST, DEMO_TEST, settings, _task(0.0))
    assert not passed and reasons == [f"MMLU accuracy delta is {bad!r}, not a finite number (base accuracy 0.3, tuned accuracy 0.3)"]
    passed, reasons = gate_verdict(DEMO_MMLU, {**DEMO_TEST, "loss": bad}, {**DEMO_TEST, "loss": bad}, settings, _task(0.0))
    assert not passed and len(reasons) == 2
    assert reasons[1] == f"held-out test loss of the tuned model is {bad!r}, not a finite number (15 test rows, 900 scored tokens)"
    passed, reasons = gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, _task(bad))
    assert not passed and reasons == [f"held-out task score delta is {bad!r}, not a finite number"]


def test_too_little_evidence_fails_and_says_how_much_is_missing():
    settings = GateSettings(min_mmlu_questions=30, min_test_rows=10, min_generation_rows=10)
    few_questions = {**DEMO_MMLU, "paired": {"n": 12, "p_value": 1.0}}
    passed, reasons = gate_verdict(few_questions, {**DEMO_TEST, "num_rows": 7}, {**DEMO_TEST, "num_rows": 7}, settings, _task(0.2, rows=3))
    assert not passed and reasons == [
        "MMLU questions scored by both models: 12, 18 fewer than the required 30 (min_mmlu_questions)",
        "held-out test rows the loss was computed on: 7, 3 fewer than the required 10 (min_test_rows)",
        "held-out generation rows the task score was computed on: 3, 7 fewer than the required 10 (min_generation_rows)",
    ]
    # An explicit count wins over the paired one; no count at all cannot be checked, so it fails too.
    assert gate_verdict(few_questions, DEMO_TEST, DEMO_TEST, settings, _task(0.0), mmlu_questions=40) == (True, [])
    passed, reasons = gate_verdict({"accuracy_delta": 0.0}, {"loss": 1.0}, {"loss": 1.0}, settings, {"delta": {"score": 0.0}})
    assert not passed and reasons == [
        "MMLU questions scored by both models: the count is unknown, so it cannot be checked against min_mmlu_questions=30",
        "held-out test rows the loss was computed on: the count is unknown, so it cannot be checked against min_test_rows=10",
        "held-out generation rows the task score was computed on: the count is unknown, so it cannot be checked against "
        "min_generation_rows=10",
    ]
    # Minimums of 0 switch the counting off, never the requirement that there is a measurement.
    none_needed = GateSettings(min_mmlu_questions=0, min_test_rows=0, min_generation_rows=0)
    assert gate_verdict(few_questions, {**DEMO_TEST, "num_rows": 1}, {**DEMO_TEST, "num_rows": 1}, none_needed, _task(0.0, rows=1)) == (True, [])
    assert not gate_verdict(few_questions, {"loss": None}, {"loss": None}, none_needed, _task(0.0))[0]


def test_without_a_task_minimum_the_task_score_does_not_gate():
    settings = GateSettings(min_task_improvement=None)
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, None) == (True, [])
    assert gate_verdict(DEMO_MMLU, DEMO_TEST, DEMO_TEST, settings, _task(NAN, rows=1)) == (True, [])


@pytest.mark.parametrize("field, value", [("max_mmlu_drop", NAN), ("max_test_loss_increase", float("inf")),
                                          ("min_task_improvement", NAN), ("min_test_rows", -1), ("min_mmlu_questions", 2.5),
                                          ("min_generation_rows", True)])
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
