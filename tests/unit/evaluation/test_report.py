"""The base-vs-tuned table and the gate in words, from real comparisons of scored generations and MMLU predictions."""

import pandas as pd
import pytest

from sft_pipeline.evaluation.answer_metrics import compare_task_metrics, score_generations
from sft_pipeline.evaluation.gate import GateSettings, evaluate_gate
from sft_pipeline.evaluation.report import comparison_markdown, comparison_rows, gate_markdown, gate_summary
from sft_pipeline.evaluation.statistics import compare_evaluations


def _generations(answers: list[str], references: list[str], kinds: list[str]) -> pd.DataFrame:
    frame = score_generations(references, answers, kinds)
    frame.insert(0, "id", [f"r{i:03d}" for i in range(len(answers))])
    return frame


@pytest.fixture(scope="module")
def evaluation():
    ticket = '{"queue": "billing", "urgency": "high"}'
    refs = [ticket] * 40 + ["The sea is wide and calm."] * 2
    kinds = ["structured"] * 40 + ["generative"] * 2
    base = _generations(["Billing, high."] * 30 + ['{"queue": "billing", "urgency": "low"}'] * 10 + ["The sea."] * 2, refs, kinds)
    tuned = _generations([ticket] * 36 + ['{"queue": "refund", "urgency": "high"}'] * 4 + ["The sea is wide."] * 2, refs, kinds)
    task = compare_task_metrics(base, tuned, primary_metric="exact_match")
    questions = [f"q{i}" for i in range(40)]
    base_pred = pd.DataFrame({"question_id": questions, "correct": [True] * 12 + [False] * 28})
    tuned_pred = pd.DataFrame({"question_id": questions, "correct": [True] * 11 + [False] + [True] + [False] * 27})
    summaries = [{"accuracy": float(p["correct"].mean())} for p in (base_pred, tuned_pred)]
    comparison = compare_evaluations(*summaries, base_pred, tuned_pred)
    test = {"loss": 1.0, "num_rows": 42, "num_tokens": 900}
    gate = evaluate_gate(comparison, test, {**test, "loss": 0.5}, GateSettings(), task)
    return comparison, task, gate


def test_rows_primary_first_then_task_metrics_then_mmlu(evaluation):
    comparison, task, _ = evaluation
    rows = comparison_rows(comparison, task, "exact_match")
    assert [r["metric"] for r in rows] == ["exact_match", "field_accuracy", "valid", "rouge_l", "mmlu_accuracy"]
    primary = rows[0]
    assert primary["primary"] and primary["n"] == 40 and primary["base"] == 0.0 and primary["tuned"] == 0.9
    assert primary["test"] == "McNemar exact" and primary["p_value"] < 1e-9
    assert primary["tuned_ci"][0] < 0.9 < primary["tuned_ci"][1] and primary["effect_ci"][0] > 0.7
    field = rows[1]
    assert field["base"] == pytest.approx(0.125) and field["tuned"] == pytest.approx(0.95)  # 10 of 40 half right; 4 of 40 half right
    assert field["test"].startswith("paired sign-flip permutation")
    assert rows[2]["base"] == pytest.approx(0.25) and rows[2]["tuned"] == 1.0
    mmlu = rows[-1]
    assert (mmlu["n"], mmlu["base"], mmlu["tuned"], mmlu["effect"]) == (40, 0.3, 0.3, 0.0) and mmlu["p_value"] == 1.0
    assert mmlu["base_ci"][0] < 0.3 < mmlu["base_ci"][1]
    # Another primary metric leads the table.
    assert [r["metric"] for r in comparison_rows(comparison, task, "field_accuracy")][:2] == ["field_accuracy", "exact_match"]
    assert comparison_rows(None, None, "exact_match") == []


def test_markdown_table_and_gate(evaluation):
    comparison, task, gate = evaluation
    table = comparison_markdown(comparison_rows(comparison, task, "exact_match"))
    lines = table.splitlines()
    assert lines[0] == "| metric | n | base [95% CI] | tuned [95% CI] | tuned - base [95% CI] | p (two-sided) |"
    assert lines[2].startswith("| **exact match** (primary) | 40 | 0.000 [0.000, 0.088] | 0.900 [")
    assert "(McNemar) |" in lines[2] and "(permutation) |" in lines[3]
    assert lines[-1].startswith("| MMLU accuracy | 40 | 0.300 [") and "| +0.000 [" in lines[-1] and lines[-1].endswith("| 1 (McNemar) |")
    assert gate["passed"] is True
    text = gate_markdown(gate)
    assert text.startswith("**Gate: passed** (alpha 0.05)")
    assert "- held-out exact_match (primary): passed; effect +0.900 [" in text and "McNemar exact p=" in text and "n=40" in text
    assert "- MMLU forgetting guard: passed; delta +0.000" in text and "one-sided McNemar p=" in text
    assert "Reasons:" not in text
    assert gate_summary(gate).startswith("Gate passed: held-out exact_match 0.000 -> 0.900, effect +0.900 (95% CI [")
    failed = {**gate, "passed": False, "reasons": ["MMLU accuracy fell by 0.100, more than the allowed 0.050"]}
    assert gate_markdown(failed).endswith("Reasons:\n\n- MMLU accuracy fell by 0.100, more than the allowed 0.050")
    assert "---" not in text.replace("|---", "")
