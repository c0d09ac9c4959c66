"""Registration: `registered_model` in the MLflow model registry."""


import dagster as dg
import pydantic

from sft_pipeline.registry import register_model
from sft_pipeline.resources import MlflowTracking, PipelineStorage

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"


class RegisteredModelConfig(dg.Config):
    """Which aliases the new version gets."""

    alias: str = pydantic.Field(default="candidate", description="Alias every new version gets.")
    champion_alias: str = pydantic.Field(default="champion", description="Alias given only when the evaluation gate passes.")


@dg.asset(code_version=CODE_VERSION, group_name="deployment", kinds={"mlflow"}, deps=["fine_tuned_model", "model_evaluation", "base_model"])
def registered_model(
    context: dg.AssetExecutionContext, config: RegisteredModelConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """The fine-tuned model logged to MLflow and registered as a new version, with aliases set by the gate verdict."""
    training = storage.read_manifest("fine_tuned_model")
    evaluation = storage.read_manifest("model_evaluation")
    base = storage.read_manifest("base_model")
    gate_passed = evaluation["gate"]["passed"]
    tuned, comparison = evaluation["tuned"], evaluation["comparison"]
    metrics = {
        "mmlu_accuracy": tuned["accuracy"],
        "mmlu_accuracy_base": comparison["base_accuracy"],
        "mmlu_accuracy_delta": comparison["accuracy_delta"],
        "train_loss": training["train_loss"],
    }
    if (tuned.get("test") or {}).get("loss") is not None:
        metrics["test_loss"] = tuned["test"]["loss"]
    info = register_model(
        mlflow_tracking.tracking_uri,
        mlflow_tracking.registered_model_name,
        training["adapter_dir"],
        base["path"],
        metrics=metrics,
        params={"base_model_source": base["source"], "method": training["method"], "steps": training["global_step"]},
        tags={
            "dagster_run_id": context.run_id,
            "base_model_revision": base["revision"],
            "gate_passed": str(gate_passed),
            "gate_reasons": "; ".join(evaluation["gate"]["reasons"]) or "all gates passed",
        },
        alias=config.alias,
        experiment=mlflow_tracking.experiment,
        promote_to=config.champion_alias if gate_passed else None,
        training_run_id=training.get("mlflow_run_id"),
    )
    storage.write_manifest("registered_model", info.to_dict())
    context.log.info("registered %s version %s with aliases %s", info.model_name, info.version, info.aliases)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(training["adapter_dir"]),
            "model_name": info.model_name,
            "version": info.version,
            "aliases": ", ".join(info.aliases),
            "model_uri": info.model_uri,
            "mlflow_run_id": info.run_id,
            "tracking_uri": mlflow_tracking.tracking_uri,
            "gate_passed": gate_passed,
        }
    )
