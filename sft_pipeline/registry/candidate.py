"""Registering a trained model as a candidate version, from the hand-offs of training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft_pipeline.registry.register import RegistrationInfo, register_model


@dataclass
class RegistrySettings:
    """Where versions are registered and when the champion alias moves."""

    tracking_uri: str
    model_name: str = "sft_pipeline_model"
    experiment: str = "sft_pipeline"
    alias: str = "candidate"
    champion_alias: str = "champion"
    promotion_metric: str = "mmlu_accuracy"
    higher_is_better: bool = True
    log_mode: str = "adapter"
    use_chat_template: bool = True


def candidate_metrics(training, evaluation) -> dict[str, float]:
    """The metrics a version is tagged and compared with: MMLU of both models, the delta, train and test loss."""
    tuned, comparison = evaluation.tuned, evaluation.comparison
    metrics = {
        "mmlu_accuracy": tuned["accuracy"],
        "mmlu_accuracy_base": comparison["base_accuracy"],
        "mmlu_accuracy_delta": comparison["accuracy_delta"],
        "train_loss": training.train_loss,
    }
    if (tuned.get("test") or {}).get("loss") is not None:
        metrics["test_loss"] = tuned["test"]["loss"]
    return metrics


def register_candidate(training, evaluation, base_model, dataset, settings: RegistrySettings,
                       tags: dict[str, Any], run_name: str) -> RegistrationInfo:
    """Log and register `training`'s weights (a TrainingResult) with the scores of `evaluation` (a
    ModelEvaluationInfo); `champion` moves only if the gate passed and the version beats the holder."""
    return register_model(
        settings.tracking_uri,
        settings.model_name,
        training.weights_dir,
        base_model.path,
        metrics=candidate_metrics(training, evaluation),
        params={"base_model_source": base_model.source, "method": training.method, "steps": training.global_step},
        tags={"base_model_revision": base_model.revision, "base_model_source": base_model.source, **tags},
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
    )
