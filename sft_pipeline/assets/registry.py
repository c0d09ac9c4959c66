"""Registration: `registered_model` in the MLflow model registry."""


import dagster as dg
import pydantic

from sft_pipeline.registry import register_model
from sft_pipeline.resources import MlflowTracking, PipelineStorage

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "2"

# Every asset upstream of registered_model: their data and code versions are tagged on the version.
UPSTREAM_ASSETS = (
    "raw_instructions", "clean_instructions", "rejected_instructions", "synthetic_instructions", "base_model",
    "sft_dataset", "fine_tuned_model", "mmlu_benchmark", "base_model_evaluation", "model_evaluation",
)


class RegisteredModelConfig(dg.Config):
    """How the model is logged and when it is promoted."""

    alias: str = pydantic.Field(default="candidate", description="Alias every new version gets.")
    champion_alias: str = pydantic.Field(
        default="champion", description="Alias moved only when the evaluation gate passes and the version beats the current holder."
    )
    promotion_metric: str = pydantic.Field(
        default="mmlu_accuracy",
        description="Metric a version must beat the champion on: mmlu_accuracy, mmlu_accuracy_delta, test_loss, train_loss; "
        "empty: the gate alone decides.",
    )
    higher_is_better: bool = pydantic.Field(default=True, description="Direction of promotion_metric (false for losses).")
    log_mode: str = pydantic.Field(
        default="adapter",
        description="adapter: PEFT adapter + reference to the local base model folder (small); "
        "merged: adapter merged into the base weights (self-contained, full size).",
    )
    use_chat_template: bool = pydantic.Field(
        default=True, description="Log a prompt template from the tokenizer's chat template, so predict() takes plain instructions."
    )
    dagster_ui_url: str = pydantic.Field(
        default="", description="Base URL of the Dagster UI (e.g. http://127.0.0.1:3000); when set, versions link back to the run."
    )


def upstream_versions(instance: dg.DagsterInstance, keys=UPSTREAM_ASSETS) -> dict[str, str]:
    """`data_version.<asset>` and `code_version.<asset>` of each upstream asset's latest materialization."""
    out = {}
    for name in keys:
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        materialization = event.asset_materialization if event is not None else None
        if materialization is None:
            continue
        tags = materialization.tags or {}
        if tags.get("dagster/data_version"):
            out[f"data_version.{name}"] = tags["dagster/data_version"]
        if tags.get("dagster/code_version"):
            out[f"code_version.{name}"] = tags["dagster/code_version"]
    return out


@dg.asset(
    code_version=CODE_VERSION,
    group_name="deployment",
    kinds={"mlflow"},
    pool="registry",
    deps=["fine_tuned_model", "model_evaluation", "base_model"],
)
def registered_model(
    context: dg.AssetExecutionContext, config: RegisteredModelConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """The fine-tuned model logged to MLflow and registered as a version: candidate always, champion when gated and better."""
    training = storage.read_manifest("fine_tuned_model")
    evaluation = storage.read_manifest("model_evaluation")
    base = storage.read_manifest("base_model")
    dataset = storage.read_manifest("sft_dataset")
    gate_passed = bool(evaluation["gate"]["passed"])
    tuned, comparison = evaluation["tuned"], evaluation["comparison"]
    metrics = {
        "mmlu_accuracy": tuned["accuracy"],
        "mmlu_accuracy_base": comparison["base_accuracy"],
        "mmlu_accuracy_delta": comparison["accuracy_delta"],
        "train_loss": training["train_loss"],
    }
    if (tuned.get("test") or {}).get("loss") is not None:
        metrics["test_loss"] = tuned["test"]["loss"]
    tags = {
        "dagster_run_id": context.run_id,
        "dagster_asset": "registered_model",
        "base_model_revision": base["revision"],
        "base_model_source": base["source"],
        **upstream_versions(context.instance),
        "code_version.registered_model": CODE_VERSION,
    }
    if config.dagster_ui_url:
        tags["dagster_run_url"] = f"{config.dagster_ui_url.rstrip('/')}/runs/{context.run_id}"
    weights = training.get("adapter_dir") or training["model_dir"]
    info = register_model(
        mlflow_tracking.tracking_uri,
        mlflow_tracking.registered_model_name,
        weights,
        base["path"],
        metrics=metrics,
        params={"base_model_source": base["source"], "method": training["method"], "steps": training["global_step"]},
        tags=tags,
        alias=config.alias,
        experiment=mlflow_tracking.experiment,
        promote_to=config.champion_alias or None,
        promotion_metric=config.promotion_metric or None,
        higher_is_better=config.higher_is_better,
        gate_passed=gate_passed,
        gate_reasons=list(evaluation["gate"]["reasons"]),
        training_run_id=training.get("mlflow_run_id"),
        evaluation_run_id=evaluation.get("mlflow_run_id"),
        datasets=dict(dataset.get("files") or {}),
        lineage_key=training.get("mlflow_run_id") or str(weights),
        log_mode=config.log_mode,
        use_chat_template=config.use_chat_template,
        run_name=f"register-{context.run_id[:8]}",
    )
    storage.write_manifest("registered_model", info.to_dict())
    promotion = info.promotion or {}
    context.log.info(
        "%s %s version %s (aliases %s); %s: %s", "registered" if info.created else "already registered (same model)",
        info.model_name, info.version, info.aliases, config.champion_alias, promotion.get("reason", "not attempted"),
    )
    metadata = {
        "path": dg.MetadataValue.path(str(weights)),
        "model_name": info.model_name,
        "version": info.version,
        "new_version": info.created,
        "aliases": ", ".join(info.aliases),
        "model_uri": info.model_uri,
        "champion_uri": f"models:/{info.model_name}@{config.champion_alias}",
        "promoted": bool(promotion.get("promoted")),
        "promotion_reason": promotion.get("reason", "not attempted"),
        "mlflow_run_id": info.run_id,
        "training_run_id": training.get("mlflow_run_id") or "",
        "evaluation_run_id": evaluation.get("mlflow_run_id") or "",
        "model_sha256": info.model_sha256,
        "log_mode": info.log_mode,
        "tracking_uri": mlflow_tracking.tracking_uri,
        "gate_passed": gate_passed,
    }
    ui = mlflow_tracking.ui_base()
    if ui:
        metadata["mlflow_model_version_url"] = dg.MetadataValue.url(f"{ui}/#/models/{info.model_name}/versions/{info.version}")
        if info.run_id and info.experiment_id:
            metadata["mlflow_run_url"] = dg.MetadataValue.url(f"{ui}/#/experiments/{info.experiment_id}/runs/{info.run_id}")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(f"v{info.version}-{info.model_sha256[:12]}"))
