"""Base vs tuned in one table: each compared metric with both models' values, 95% intervals, the paired
difference and its p-value; and the gate verdict in words. Plain Markdown, shared by the `model_evaluation`
metadata and the registered version's model card."""

from __future__ import annotations

import math
from typing import Any, Mapping

# Task metrics shown after the primary one, when some held-out row has them.
REPORT_METRICS = ("exact_match", "field_accuracy", "valid", "rouge_l")
METRIC_LABELS = {
    "exact_match": "exact match", "field_accuracy": "field accuracy", "valid": "valid JSON", "f1": "token F1",
    "rouge_l": "ROUGE-L (free text)", "score": "task score", "mmlu_accuracy": "MMLU accuracy",
}
SHORT_TESTS = {"McNemar exact": "McNemar", "paired sign-flip permutation test of the mean difference": "permutation"}


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def comparison_rows(comparison: Mapping[str, Any] | None, task: Mapping[str, Any] | None, primary_metric: str | None,
                    base: Mapping[str, Any] | None = None, tuned: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per compared metric: the primary held-out metric first, then the other task metrics in
    `REPORT_METRICS` that some row has, then MMLU accuracy. Each row: metric, label, primary, n, base,
    base_ci, tuned, tuned_ci, effect (tuned - base, paired), effect_ci, p_value (two-sided), test.

    `comparison`: `compare_evaluations`; `task`: `compare_task_metrics`; `base`/`tuned`: the MMLU summaries
    (their `accuracy_ci` when the paired test has no per-side interval).
    """
    rows: list[dict[str, Any]] = []
    paired_task = (task or {}).get("paired") or {}
    primary_metric = primary_metric or (task or {}).get("primary_metric")
    order = ([primary_metric] if primary_metric else []) + [m for m in REPORT_METRICS if m != primary_metric]
    for metric in order:
        paired = paired_task.get(metric)
        if not paired or not paired.get("n"):
            continue
        rows.append({"metric": metric, "label": METRIC_LABELS.get(metric, metric), "primary": metric == primary_metric,
                     **{k: paired.get(k) for k in ("n", "base", "base_ci", "tuned", "tuned_ci", "effect", "effect_ci",
                                                   "p_value", "test")}})
    comparison = comparison or {}
    if comparison.get("base_accuracy") is not None or comparison.get("tuned_accuracy") is not None:
        paired = comparison.get("paired") or {}
        rows.append({
            "metric": "mmlu_accuracy", "label": METRIC_LABELS["mmlu_accuracy"], "primary": False,
            "n": paired.get("n"), "base": comparison.get("base_accuracy"),
            "base_ci": paired.get("base_ci") or (base or {}).get("accuracy_ci"),
            "tuned": comparison.get("tuned_accuracy"), "tuned_ci": paired.get("tuned_ci") or (tuned or {}).get("accuracy_ci"),
            "effect": paired.get("delta", comparison.get("accuracy_delta")), "effect_ci": paired.get("delta_ci"),
            "p_value": paired.get("p_value"), "test": paired.get("test"),
        })
    return rows


def _value(value: Any, ci: Any, signed: bool = False) -> str:
    number = _finite(value)
    if number is None:
        return "n/a"
    fmt = "+.3f" if signed else ".3f"
    text = format(number, fmt)
    if ci and _finite(ci[0]) is not None and _finite(ci[1]) is not None:
        text += f" [{format(float(ci[0]), fmt)}, {format(float(ci[1]), fmt)}]"
    return text


def _p_value(row: Mapping[str, Any]) -> str:
    p = _finite(row.get("p_value"))
    if p is None:
        return "n/a"
    test = SHORT_TESTS.get(str(row.get("test")), str(row.get("test") or "").split(" (")[0])
    return f"{p:.3g} ({test})" if test else f"{p:.3g}"


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of `comparison_rows` as a Markdown table with 95% intervals."""
    lines = ["| metric | n | base [95% CI] | tuned [95% CI] | tuned - base [95% CI] | p (two-sided) |",
             "|---|---:|---|---|---|---|"]
    for row in rows:
        label = f"**{row['label']}** (primary)" if row.get("primary") else row["label"]
        lines.append(f"| {label} | {row.get('n') if row.get('n') is not None else 'n/a'} | {_value(row.get('base'), row.get('base_ci'))} | "
                     f"{_value(row.get('tuned'), row.get('tuned_ci'))} | {_value(row.get('effect'), row.get('effect_ci'), signed=True)} | "
                     f"{_p_value(row)} |")
    if not rows:
        lines.append("| (no measurements) | | | | | |")
    return "\n".join(lines)


def _p(value: Any) -> str:
    number = _finite(value)
    return "n/a" if number is None else f"{number:.3g}"


def _verdict(passed: Any) -> str:
    return "not gated" if passed is None else ("passed" if passed else "failed")


def gate_summary(gate: Mapping[str, Any] | None) -> str:
    """One sentence on the gate: verdict, primary metric, effect with its interval, p-value and n."""
    gate = gate or {}
    task = gate.get("task") or {}
    verdict = "passed" if gate.get("passed") is True else "failed"
    if task.get("n"):
        ci = task.get("effect_ci")
        ci_text = f" (95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else ""
        return (f"Gate {verdict}: held-out {task.get('metric')} {_value(task.get('base'), None)} -> "
                f"{_value(task.get('tuned'), None)}, effect {_value(task.get('effect'), None, signed=True)}{ci_text}, "
                f"{task.get('test')} p={_p(task.get('p_value'))}, n={task.get('n')}.")
    return f"Gate {verdict}."


def gate_markdown(gate: Mapping[str, Any] | None) -> str:
    """The gate verdict with each criterion's numbers and, when it failed, every reason, as a Markdown list."""
    gate = gate or {}
    alpha = gate.get("alpha")
    lines = [f"**Gate: {'passed' if gate.get('passed') is True else 'failed'}**"
             + (f" (alpha {alpha:g})" if _finite(alpha) is not None else ""), ""]
    task = gate.get("task") or {}
    if task:
        if task.get("gated") is False:
            lines.append(f"- held-out {task.get('metric')}: not gated (min_task_improvement is null)")
        else:
            lines.append(
                f"- held-out {task.get('metric')} (primary): {_verdict(task.get('passed'))}; effect "
                f"{_value(task.get('effect'), task.get('effect_ci'), signed=True)}, {task.get('test') or 'no test'} "
                f"p={_p(task.get('p_value'))} (two-sided), n={task.get('n', 'n/a')}; needs effect > 0, p < alpha"
                + (f" and effect >= {task['min_effect']:+.3f}" if (_finite(task.get("min_effect")) or 0) > 0 else ""))
    mmlu = gate.get("mmlu") or {}
    if mmlu:
        lines.append(
            f"- MMLU forgetting guard: {_verdict(mmlu.get('passed'))}; delta {_value(mmlu.get('delta'), mmlu.get('delta_ci'), signed=True)}, "
            f"one-sided McNemar p={_p(mmlu.get('p_value'))} (tuned worse), n={mmlu.get('n', 'n/a')}; fails when p < alpha or "
            f"the drop exceeds {_value(mmlu.get('max_drop'), None)}")
    loss = gate.get("test_loss") or {}
    if loss:
        lines.append(f"- held-out test loss: {_verdict(loss.get('passed'))}; base {_value(loss.get('base'), None)} -> tuned "
                     f"{_value(loss.get('tuned'), None)}, may rise by at most {_value(loss.get('max_increase'), None)}")
    reasons = list(gate.get("reasons") or [])
    if reasons:
        lines += ["", "Reasons:", ""] + [f"- {r}" for r in reasons]
    return "\n".join(lines)
