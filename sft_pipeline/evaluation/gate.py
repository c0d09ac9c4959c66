"""The promotion rule: whether a tuned model may be registered as better than its base, and why not.

A criterion passes only on evidence: a measurement that is missing, NaN, infinite or taken on fewer
rows or questions than its minimum fails the gate with a reason that names it, never passes silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass
class GateSettings:
    """The thresholds a tuned model must meet to be promoted, and how much evidence each needs."""

    max_mmlu_drop: float = 0.05
    max_test_loss_increase: float = 0.0
    # None: the task score is reported but does not gate (e.g. when generation is switched off).
    min_task_improvement: float | None = 0.0
    # Defaults sit below what the embedded demo measures (40 MMLU questions, ~15 held-out rows, as many
    # generations) and well above the handful of rows that made an unevaluated model champion.
    min_mmlu_questions: int = 30
    min_test_rows: int = 10
    min_generation_rows: int = 10

    def __post_init__(self) -> None:
        # A NaN threshold compares false and would wave every model through.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("min_") and f.name != "min_task_improvement":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"GateSettings.{f.name} must be a whole number >= 0, got {value!r}")
            elif value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"GateSettings.{f.name} must be a finite number, got {value!r}")


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _describe(value: Any) -> str:
    return "missing" if value is None else f"{value!r}, not a finite number"


def _too_few(what: str, count: Any, minimum: int, setting: str) -> str | None:
    if count is None:
        return f"{what}: the count is unknown, so it cannot be checked against {setting}={minimum}"
    if int(count) < minimum:
        return f"{what}: {int(count)}, {minimum - int(count)} fewer than the required {minimum} ({setting})"
    return None


def gate_verdict(
    comparison: Mapping[str, Any],
    base_test: Mapping[str, Any] | None,
    tuned_test: Mapping[str, Any] | None,
    settings: GateSettings,
    task: Mapping[str, Any] | None = None,
    mmlu_questions: int | None = None,
) -> tuple[bool, list[str]]:
    """Whether the tuned model may be promoted, and every reason why not.

    `comparison`: `compare_evaluations` (its `accuracy_delta`, and `paired.n` for the questions both
    models scored unless `mmlu_questions` says); `base_test`/`tuned_test`: `heldout_loss` of each model
    (`loss`, `num_rows`, `num_tokens`); `task`: `compare_task_metrics` (`delta.score`, each side's `rows`),
    None when no generations were made.
    """
    reasons: list[str] = []

    raw_delta = comparison.get("accuracy_delta")
    delta = _finite(raw_delta)
    if mmlu_questions is None:
        mmlu_questions = (comparison.get("paired") or {}).get("n")
    if delta is None:
        reasons.append(f"MMLU accuracy delta is {_describe(raw_delta)} (base accuracy {comparison.get('base_accuracy')!r}, "
                       f"tuned accuracy {comparison.get('tuned_accuracy')!r})")
    few = _too_few("MMLU questions scored by both models", mmlu_questions, settings.min_mmlu_questions, "min_mmlu_questions")
    if few:
        reasons.append(few)
    if delta is not None and delta < -settings.max_mmlu_drop:
        paired = comparison.get("paired") or {}
        p = f" (McNemar p={paired['p_value']:.3g})" if paired.get("p_value") is not None else ""
        reasons.append(f"MMLU accuracy fell by {-delta:.3f}, more than the allowed {settings.max_mmlu_drop:.3f}{p}")

    base_test, tuned_test = base_test or {}, tuned_test or {}
    losses = {}
    for side, test in (("base", base_test), ("tuned", tuned_test)):
        losses[side] = _finite(test.get("loss"))
        if losses[side] is None:
            why = ("no scored tokens: the test split is empty or has no assistant tokens" if not test.get("num_tokens")
                   else f"{test.get('num_rows', '?')} test rows, {test['num_tokens']} scored tokens")
            reasons.append(f"held-out test loss of the {side} model is {_describe(test.get('loss'))} ({why})")
    rows = [t.get("num_rows") for t in (base_test, tuned_test)]
    if all(loss is not None for loss in losses.values()):
        few = _too_few("held-out test rows the loss was computed on", None if None in rows else min(rows),
                       settings.min_test_rows, "min_test_rows")
        if few:
            reasons.append(few)
        if losses["tuned"] - losses["base"] > settings.max_test_loss_increase:
            reasons.append(f"held-out test loss rose from {losses['base']:.4f} to {losses['tuned']:.4f}, more than the "
                           f"allowed {settings.max_test_loss_increase:.4f}")

    if settings.min_task_improvement is not None:
        raw_task = ((task or {}).get("delta") or {}).get("score")
        task_delta = _finite(raw_task)
        if task is None:
            reasons.append("held-out task score delta is missing: no generations were scored (generation_rows is 0 or the "
                           "test split is empty); set min_task_improvement to null to gate without it")
        elif task_delta is None:
            reasons.append(f"held-out task score delta is {_describe(raw_task)}")
        if task is not None:
            counts = [(task.get(side) or {}).get("rows") for side in ("base", "tuned")]
            few = _too_few("held-out generation rows the task score was computed on", None if None in counts else min(counts),
                           settings.min_generation_rows, "min_generation_rows")
            if few:
                reasons.append(few)
        if task_delta is not None and task_delta < settings.min_task_improvement:
            reasons.append(f"held-out task score changed by {task_delta:+.3f}, less than the required "
                           f"{settings.min_task_improvement:+.3f}")
    return not reasons, reasons
