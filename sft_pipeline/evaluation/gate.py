"""The promotion rule: whether a tuned model may be registered as better than its base, and why not.

Three criteria, each with its numbers in the verdict:

* **task** (while `min_task_improvement` is set): a significant improvement of the primary held-out metric,
  paired over the rows both models answered: effect = mean(tuned_i - base_i) > 0 and the two-sided p-value
  of the paired test (exact McNemar for 0/1 scores, sign-flip permutation test otherwise) below `alpha`;
  the effect must also reach `min_task_improvement`;
* **mmlu** (the forgetting guard), paired over the same questions: fails when the tuned model is
  significantly worse (one-sided exact McNemar p < `alpha`) or its accuracy fell by more than `max_mmlu_drop`;
* **test_loss**: the held-out test loss may rise by at most `max_test_loss_increase`.

A criterion passes only on evidence: a measurement that is missing, NaN, infinite or taken on fewer
rows or questions than its minimum fails the gate with a reason that names it, never passes silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from sft_pipeline.evaluation.answer_metrics import METRIC_KINDS, TASK_METRIC_KEYS


@dataclass
class GateSettings:
    """The thresholds a tuned model must meet to be promoted, and how much evidence each needs."""

    max_mmlu_drop: float = 0.05
    max_test_loss_increase: float = 0.0
    # None: the task metric is reported but does not gate (e.g. when generation is switched off).
    min_task_improvement: float | None = 0.0
    # Defaults sit below what the embedded demo measures (40 MMLU questions, ~100 held-out rows, as many
    # generations) and well above the handful of rows that made an unevaluated model champion.
    min_mmlu_questions: int = 30
    min_test_rows: int = 10
    min_generation_rows: int = 10
    # The held-out metric the task criterion tests (`answer_metrics.TASK_METRIC_KEYS`).
    primary_metric: str = "exact_match"
    # Significance level of the task test (two-sided) and of the forgetting guard (one-sided).
    alpha: float = 0.05

    def __post_init__(self) -> None:
        # A NaN threshold compares false and would wave every model through.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "primary_metric":
                if value not in TASK_METRIC_KEYS:
                    raise ValueError(f"GateSettings.primary_metric must be one of {TASK_METRIC_KEYS}, got {value!r}")
            elif f.name.startswith("min_") and f.name != "min_task_improvement":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"GateSettings.{f.name} must be a whole number >= 0, got {value!r}")
            elif value is not None and (isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value))):
                raise ValueError(f"GateSettings.{f.name} must be a finite number, got {value!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"GateSettings.alpha must be between 0 and 1 (exclusive), got {self.alpha!r}")


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


def _p(p: Any) -> str:
    return "n/a" if _finite(p) is None else f"{float(p):.3g}"


def _ci(ci: Any) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a"


def _num(value: Any, fmt: str = ".3f") -> str:
    return "n/a" if _finite(value) is None else format(float(value), fmt)


def _mmlu_criterion(comparison: Mapping[str, Any], settings: GateSettings, mmlu_questions: int | None,
                    reasons: list[str]) -> dict[str, Any]:
    start = len(reasons)
    paired = comparison.get("paired") or {}
    raw_delta = comparison.get("accuracy_delta")
    delta = _finite(raw_delta)
    if mmlu_questions is None:
        mmlu_questions = paired.get("n")
    p_worse = _finite(paired.get("p_value_tuned_worse"))
    record = {"test": "McNemar exact, one-sided (tuned worse)", "n": mmlu_questions,
              "base": comparison.get("base_accuracy"), "tuned": comparison.get("tuned_accuracy"), "delta": delta,
              "delta_ci": paired.get("delta_ci"), "p_value": p_worse, "p_value_two_sided": paired.get("p_value"),
              "newly_right": paired.get("tuned_only_correct"), "newly_wrong": paired.get("base_only_correct"),
              "max_drop": settings.max_mmlu_drop, "min_questions": settings.min_mmlu_questions}
    if delta is None:
        reasons.append(f"MMLU accuracy delta is {_describe(raw_delta)} (base accuracy {comparison.get('base_accuracy')!r}, "
                       f"tuned accuracy {comparison.get('tuned_accuracy')!r})")
    few = _too_few("MMLU questions scored by both models", mmlu_questions, settings.min_mmlu_questions, "min_mmlu_questions")
    if few:
        reasons.append(few)
    if p_worse is None:
        reasons.append(f"MMLU paired test is {_describe(paired.get('p_value_tuned_worse'))}: without both models' "
                       "per-question predictions a significant drop cannot be ruled out")
    changed = (f"{paired.get('base_only_correct', '?')} newly wrong, {paired.get('tuned_only_correct', '?')} newly right"
               if paired else "no paired counts")
    if delta is not None and delta < -settings.max_mmlu_drop:
        reasons.append(f"MMLU accuracy fell by {-delta:.3f}, more than the allowed {settings.max_mmlu_drop:.3f} "
                       f"(one-sided McNemar p={_p(p_worse)}, n={mmlu_questions}, {changed})")
    if p_worse is not None and p_worse < settings.alpha:
        reasons.append(f"MMLU accuracy is significantly lower: base {_num(comparison.get('base_accuracy'))} -> tuned "
                       f"{_num(comparison.get('tuned_accuracy'))} (delta {_num(delta, '+.3f')}, 95% CI {_ci(paired.get('delta_ci'))}), "
                       f"one-sided McNemar p={_p(p_worse)} < alpha {settings.alpha:g} (n={mmlu_questions}, {changed})")
    record["passed"] = len(reasons) == start
    return record


def _test_loss_criterion(base_test: Mapping[str, Any], tuned_test: Mapping[str, Any], settings: GateSettings,
                         reasons: list[str]) -> dict[str, Any]:
    start = len(reasons)
    losses = {}
    for side, test in (("base", base_test), ("tuned", tuned_test)):
        losses[side] = _finite(test.get("loss"))
        if losses[side] is None:
            why = ("no scored tokens: the test split is empty or has no assistant tokens" if not test.get("num_tokens")
                   else f"{test.get('num_rows', '?')} test rows, {test['num_tokens']} scored tokens")
            reasons.append(f"held-out test loss of the {side} model is {_describe(test.get('loss'))} ({why})")
    rows = [t.get("num_rows") for t in (base_test, tuned_test)]
    n = None if None in rows else min(rows)
    increase = None
    if all(loss is not None for loss in losses.values()):
        few = _too_few("held-out test rows the loss was computed on", n, settings.min_test_rows, "min_test_rows")
        if few:
            reasons.append(few)
        increase = losses["tuned"] - losses["base"]
        if increase > settings.max_test_loss_increase:
            reasons.append(f"held-out test loss rose from {losses['base']:.4f} to {losses['tuned']:.4f}, more than the "
                           f"allowed {settings.max_test_loss_increase:.4f}")
    return {"base": losses["base"], "tuned": losses["tuned"], "increase": increase, "n": n,
            "max_increase": settings.max_test_loss_increase, "min_rows": settings.min_test_rows, "passed": len(reasons) == start}


def _task_criterion(task: Mapping[str, Any] | None, settings: GateSettings, reasons: list[str]) -> dict[str, Any]:
    metric = settings.primary_metric
    record: dict[str, Any] = {"metric": metric, "gated": settings.min_task_improvement is not None, "alternative": "two-sided",
                              "min_effect": settings.min_task_improvement, "min_rows": settings.min_generation_rows}
    primary = ((task or {}).get("paired") or {}).get(metric)
    if primary is None and (task or {}).get("primary_metric") == metric:
        primary = (task or {}).get("primary")
    for key in ("test", "n", "base", "tuned", "base_ci", "tuned_ci", "effect", "effect_ci", "ci_method", "p_value",
                "p_value_tuned_better", "base_only_correct", "tuned_only_correct"):
        if primary is not None and key in primary:
            record[key] = primary[key]
    if not record["gated"]:
        record["passed"] = None
        return record
    start = len(reasons)
    if task is None:
        reasons.append("held-out task score delta is missing: no generations were scored (generation_rows is -1 or the "
                       "test split is empty); set min_task_improvement to null to gate without it")
    elif primary is None or not primary.get("n"):
        counts = ", ".join(f"{(task.get('tuned') or {}).get(f'{k}_rows', 0)} {k}" for k in ("structured", "classification", "generative"))
        reasons.append(f"held-out {metric} is missing: no held-out row both models answered has it ({metric} is measured on "
                       f"{' and '.join(METRIC_KINDS[metric])} rows; the answered rows were {counts}); choose another "
                       "primary_metric or set min_task_improvement to null")
    else:
        n, effect, p = primary.get("n"), _finite(primary.get("effect")), _finite(primary.get("p_value"))
        if effect is None:
            reasons.append(f"held-out {metric} effect (mean paired difference) is {_describe(primary.get('effect'))}")
        few = _too_few(f"held-out rows with a paired {metric}", n, settings.min_generation_rows, "min_generation_rows")
        if few:
            reasons.append(few)
        if p is None:
            reasons.append(f"held-out {metric} paired test p-value is {_describe(primary.get('p_value'))}")
        if effect is not None and p is not None and not (effect > 0 and p < settings.alpha):
            verdict = "did not improve" if effect <= 0 else "did not improve significantly"
            reasons.append(f"held-out {metric} {verdict}: base {_num(primary.get('base'))} -> tuned {_num(primary.get('tuned'))}, "
                           f"effect {effect:+.3f} (95% CI {_ci(primary.get('effect_ci'))}), {primary.get('test')} p={_p(p)} "
                           f"(two-sided), not below alpha {settings.alpha:g} (n={n})")
        if effect is not None and 0 < effect < settings.min_task_improvement:
            reasons.append(f"held-out {metric} improved by {effect:+.3f}, less than the required "
                           f"{settings.min_task_improvement:+.3f} (min_task_improvement)")
    record["passed"] = len(reasons) == start
    return record


def evaluate_gate(
    comparison: Mapping[str, Any],
    base_test: Mapping[str, Any] | None,
    tuned_test: Mapping[str, Any] | None,
    settings: GateSettings,
    task: Mapping[str, Any] | None = None,
    mmlu_questions: int | None = None,
) -> dict[str, Any]:
    """The verdict with its numbers: {"passed", "reasons", "primary_metric", "alpha", "task", "mmlu", "test_loss"},
    each criterion a dict with its measurements, test, p-value, thresholds and "passed" (None: not gated).

    `comparison`: `compare_evaluations` (its `accuracy_delta` and `paired`: n, one-sided p-value
    `p_value_tuned_worse`, `delta_ci`; `mmlu_questions` overrides the paired count);
    `base_test`/`tuned_test`: `heldout_loss` of each model (`loss`, `num_rows`, `num_tokens`);
    `task`: `compare_task_metrics` (its `paired[<primary_metric>]`), None when no generations were made.
    """
    reasons: list[str] = []
    mmlu = _mmlu_criterion(comparison, settings, mmlu_questions, reasons)
    test_loss = _test_loss_criterion(base_test or {}, tuned_test or {}, settings, reasons)
    task_record = _task_criterion(task, settings, reasons)
    return {"passed": not reasons, "reasons": reasons, "primary_metric": settings.primary_metric, "alpha": settings.alpha,
            "task": task_record, "mmlu": mmlu, "test_loss": test_loss}


def gate_verdict(
    comparison: Mapping[str, Any],
    base_test: Mapping[str, Any] | None,
    tuned_test: Mapping[str, Any] | None,
    settings: GateSettings,
    task: Mapping[str, Any] | None = None,
    mmlu_questions: int | None = None,
) -> tuple[bool, list[str]]:
    """Whether the tuned model may be promoted, and every reason why not (`evaluate_gate` without the numbers)."""
    record = evaluate_gate(comparison, base_test, tuned_test, settings, task, mmlu_questions)
    return record["passed"], record["reasons"]
