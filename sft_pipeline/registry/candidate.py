"""Registering a trained model as a candidate version, from the hand-offs of training and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from sft_pipeline.registry.register import RegistrationInfo, register_model

# Version tags with the gate's numbers: gate.passed, gate.primary_metric, gate.p_value, gate.effect, ...
GATE_TAG_PREFIX = "gate."


@dataclass
class RegistrySettings:
    """Where versions are registered and when the champion alias moves."""

    tracking_uri: str
    model_name: str = "sft_pipeline_model"
    experiment: str = "sft_pipeline"
    alias: str = "candidate"
    champion_alias: str = "champion"
    promotion_metric: str = "task_exact_match"
    higher_is_better: bool = True
    log_mode: str = "adapter"
    use_chat_template: bool = True


def candidate_metrics(training, evaluation) -> dict[str, float]:
    """The metrics a version is tagged and compared with: MMLU of both models, the delta, train and test loss,
    and every held-out task metric of both models (`task_<metric>`, `task_<metric>_base`)."""
    tuned, comparison = evaluation.tuned, evaluation.comparison
    metrics = {
        "mmlu_accuracy": tuned["accuracy"],
        "mmlu_accuracy_base": comparison["base_accuracy"],
        "mmlu_accuracy_delta": comparison["accuracy_delta"],
        "train_loss": training.train_loss,
    }
    if (tuned.get("test") or {}).get("loss") is not None:
        metrics["test_loss"] = tuned["test"]["loss"]
    task = evaluation.task or {}
    for side, suffix in (("tuned", ""), ("base", "_base")):
        for metric, value in (task.get(side) or {}).items():
            if not metric.endswith("rows") and value is not None:
                metrics[f"task_{metric}{suffix}"] = value
    return metrics


def _tag_number(value: Any) -> str | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return f"{number:.6g}" if math.isfinite(number) else None


def gate_tags(gate: Mapping[str, Any] | None) -> dict[str, str]:
    """The gate's verdict and numbers as version tags: gate.passed, gate.primary_metric, gate.alpha, gate.test,
    gate.n, gate.base, gate.tuned, gate.effect, gate.effect_ci, gate.p_value (the primary held-out metric's
    paired test) and gate.mmlu_delta, gate.mmlu_p_value (the forgetting guard's one-sided test). A number that
    was not measured gets no tag; the reasons are the `gate_reasons` tag `register_model` writes."""
    gate = gate or {}
    task, mmlu = gate.get("task") or {}, gate.get("mmlu") or {}
    tags = {"passed": str(gate.get("passed") is True), "primary_metric": gate.get("primary_metric") or task.get("metric"),
            "test": task.get("test"), "n": task.get("n")}
    for key, value in (("alpha", gate.get("alpha")), ("base", task.get("base")), ("tuned", task.get("tuned")),
                       ("effect", task.get("effect")), ("p_value", task.get("p_value")),
                       ("mmlu_delta", mmlu.get("delta")), ("mmlu_p_value", mmlu.get("p_value"))):
        tags[key] = _tag_number(value)
    ci = task.get("effect_ci")
    if ci and all(_tag_number(v) is not None for v in ci):
        tags["effect_ci"] = f"[{_tag_number(ci[0])}, {_tag_number(ci[1])}]"
    return {f"{GATE_TAG_PREFIX}{k}": str(v) for k, v in tags.items() if v is not None}


def evaluation_report(evaluation) -> dict[str, Any]:
    """What the model card shows of an evaluation hand-off (`ModelEvaluationInfo`): the base-vs-tuned rows
    (`evaluation.report.comparison_rows`) and the gate verdict with its numbers."""
    from sft_pipeline.evaluation.report import comparison_rows

    gate = dict(evaluation.gate or {})
    return {"rows": comparison_rows(evaluation.comparison, evaluation.task, gate.get("primary_metric"),
                                    evaluation.base, evaluation.tuned),
            "gate": gate}


def register_candidate(training, evaluation, base_model, dataset, settings: RegistrySettings,
                       tags: dict[str, Any], run_name: str) -> RegistrationInfo:
    """Log and register `training`'s weights (a TrainingResult) with the scores of `evaluation` (a
    ModelEvaluationInfo): its metrics, the gate's numbers as `gate.*` tags, and a model card with the
    base-vs-tuned table and the verdict; `champion` moves only if the gate passed and the version beats the holder."""
    return register_model(
        settings.tracking_uri,
        settings.model_name,
        training.weights_dir,
        base_model.path,
        metrics=candidate_metrics(training, evaluation),
        params={"base_model_source": base_model.source, "method": training.method, "steps": training.global_step},
        tags={"base_model_revision": base_model.revision, "base_model_source": base_model.source,
              **gate_tags(evaluation.gate), **tags},
        alias=settings.alias,
        experiment=settings.experiment,
        promote_to=settings.champion_alias or None,
        promotion_metric=settings.promotion_metric or None,
        higher_is_better=settings.higher_is_better,
        gate_passed=evaluation.gate_passed,
        gate_reasons=list(evaluation.gate.get("reasons") or []),
        training_run_id=training.mlflow_run_id,
        evaluation_run_id=evaluation.mlflow_run_id,
        datasets=dict(dataset.files or {}),
        lineage_key=training.mlflow_run_id or str(training.weights_dir),
        log_mode=settings.log_mode,
        use_chat_template=settings.use_chat_template,
        run_name=run_name,
        evaluation=evaluation_report(evaluation),
    )
