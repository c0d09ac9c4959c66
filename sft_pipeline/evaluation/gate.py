"""The promotion rule: whether a tuned model may be registered as better than its base, and why not."""

from __future__ import annotations


def gate_verdict(
    comparison: dict,
    base_test: dict,
    tuned_test: dict,
    max_mmlu_drop: float,
    max_test_loss_increase: float,
    task_delta: float | None = None,
    min_task_improvement: float | None = None,
) -> tuple[bool, list[str]]:
    """Whether the tuned model may be promoted, and why not when it may not."""
    reasons = []
    if comparison["accuracy_delta"] is not None and comparison["accuracy_delta"] < -max_mmlu_drop:
        paired = comparison.get("paired") or {}
        p = f" (McNemar p={paired['p_value']:.3g})" if paired.get("p_value") is not None else ""
        reasons.append(f"MMLU accuracy fell by {-comparison['accuracy_delta']:.3f}, more than the allowed {max_mmlu_drop:.3f}{p}")
    base_loss, tuned_loss = base_test.get("loss"), tuned_test.get("loss")
    if base_loss is not None and tuned_loss is not None and tuned_loss - base_loss > max_test_loss_increase:
        reasons.append(f"held-out test loss rose from {base_loss:.4f} to {tuned_loss:.4f}")
    if task_delta is not None and min_task_improvement is not None and task_delta < min_task_improvement:
        reasons.append(f"held-out task score changed by {task_delta:+.3f}, less than the required {min_task_improvement:+.3f}")
    return not reasons, reasons
