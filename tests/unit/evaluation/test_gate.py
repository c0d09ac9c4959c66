"""The promotion rule."""

from sft_pipeline.evaluation.gate import gate_verdict


def test_gate_verdict():
    comparison = {"accuracy_delta": -0.1, "paired": {"p_value": 0.02}}
    passed, reasons = gate_verdict(comparison, {"loss": 1.0}, {"loss": 0.9}, 0.05, 0.0, task_delta=0.1, min_task_improvement=0.0)
    assert not passed and len(reasons) == 1 and "p=0.02" in reasons[0]
    passed, reasons = gate_verdict({"accuracy_delta": 0.0}, {"loss": 1.0}, {"loss": 1.2}, 0.05, 0.0, task_delta=-0.2, min_task_improvement=0.0)
    assert not passed and len(reasons) == 2
    assert gate_verdict({"accuracy_delta": -0.01}, {"loss": 1.0}, {"loss": 1.0}, 0.05, 0.0, None, 0.0) == (True, [])


def test_gate_skips_what_was_not_measured():
    # No MMLU delta, no held-out loss, no task score: nothing to fail on.
    assert gate_verdict({"accuracy_delta": None}, {"loss": None}, {}, 0.0, 0.0) == (True, [])
    passed, reasons = gate_verdict({"accuracy_delta": -0.2}, {}, {}, 0.05, 0.0)
    assert not passed and reasons == ["MMLU accuracy fell by 0.200, more than the allowed 0.050"]
    # A loss increase within the allowance passes; a task loss above a negative threshold passes too.
    assert gate_verdict({"accuracy_delta": 0.0}, {"loss": 1.0}, {"loss": 1.05}, 0.05, 0.1, -0.05, -0.1)[0]
