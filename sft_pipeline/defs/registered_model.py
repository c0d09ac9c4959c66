"""Registration: `registered_model`, a version in the MLflow model registry (candidate always, champion when earned)."""

import dagster as dg
import pydantic

from sft_pipeline.defs.resources import MlflowTracking
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.outputs import ModelEvaluationInfo
from sft_pipeline.registry.candidate import RegistrySettings, register_candidate
from sft_pipeline.registry.register import RegistrationInfo
from sft_pipeline.tokenization import SftDatasetInfo
from sft_pipeline.training import TrainingResult

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "4"


class RegisteredModelConfig(dg.Config):
    """How the model is logged and when it is promoted."""

    alias: str = pydantic.Field(default="candidate", description="Alias every new version gets.")
    champion_alias: str = pydantic.Field(
        default="champion", description="Alias moved only when the evaluation gate passes and the version beats the current holder."
    )
    promotion_metric: str = pydantic.Field(
        default="task_exact_match",
        description="Metric a version must beat the champion on: task_<metric> (the held-out task metrics: task_exact_match, "
        "task_field_accuracy, task_valid, task_score, ...), mmlu_accuracy, mmlu_accuracy_delta, test_loss, train_loss; "
        "empty: the gate alone decides.",
    )
    higher_is_better: bool = pydantic.Field(default=True, description="Direction of promotion_metric (false for losses).")
    log_mode: str = pydantic.Field(
        default="adapter",
        description="adapter: PEFT adapter + reference to the local base model folder (small); "
        "merged: adapter merged into the base weights (self-contained, full size).",
    )
    use_chat_template: bool = pydantic.Field(
        default=True, description="Log a model with a chat template as a chat model (MLflow llm/v1/chat: OpenAI-style messages in, chat completions out); false: a text-generation model taking plain strings."
    )
    dagster_ui_url: str = pydantic.Field(
        default="", description="Base URL of the Dagster UI (e.g. http://127.0.0.1:3000); when set, versions link back to the run."
    )


@dg.asset(code_version=CODE_VERSION, group_name="deployment", kinds={"mlflow"}, pool="registry")
def registered_model(
    context: dg.AssetExecutionContext, config: RegisteredModelConfig, mlflow_tracking: MlflowTracking,
    fine_tuned_model: TrainingResult, model_evaluation: ModelEvaluationInfo, base_model: BaseModelInfo, sft_dataset: SftDatasetInfo,
) -> dg.MaterializeResult[RegistrationInfo]:
    """The fine-tuned model logged to MLflow and registered as a version: candidate always, champion when gated and better."""
    settings = RegistrySettings(
        tracking_uri=mlflow_tracking.tracking_uri, model_name=mlflow_tracking.registered_model_name,
        experiment=mlflow_tracking.experiment, alias=config.alias, champion_alias=config.champion_alias,
        promotion_metric=config.promotion_metric, higher_is_better=config.higher_is_better,
        log_mode=config.log_mode, use_chat_template=config.use_chat_template,
    )
    # The data versions this version was made from: every input is a declared hand-off of this run's lineage.
    tags = {
        "dagster_run_id": context.run_id,
        "dagster_asset": "registered_model",
        "code_version.registered_model": CODE_VERSION,
        "data_version.fine_tuned_model": fine_tuned_model.weights_hash,
        "data_version.model_evaluation": model_evaluation.digest,
        "data_version.sft_dataset": sft_dataset.content_hash,
        "data_version.base_model": base_model.content_hash or base_model.revision,
    }
    if config.dagster_ui_url:
        tags["dagster_run_url"] = f"{config.dagster_ui_url.rstrip('/')}/runs/{context.run_id}"
    info = register_candidate(fine_tuned_model, model_evaluation, base_model, sft_dataset, settings, tags,
                              run_name=f"register-{context.run_id[:8]}")
    promotion = info.promotion or {}
    context.log.info(
        "%s %s version %s (aliases %s); %s: %s", "registered" if info.created else "already registered (same model)",
        info.model_name, info.version, info.aliases, config.champion_alias, promotion.get("reason", "not attempted"),
    )
    metadata = {
        "path": dg.MetadataValue.path(str(fine_tuned_model.weights_dir)),
        "model_name": info.model_name,
        "version": info.version,
        "new_version": info.created,
        "aliases": ", ".join(info.aliases),
        "model_uri": info.model_uri,
        "champion_uri": f"models:/{info.model_name}@{config.champion_alias}",
        "promoted": bool(promotion.get("promoted")),
        "promotion_reason": promotion.get("reason", "not attempted"),
        "mlflow_run_id": info.run_id,
        "training_run_id": fine_tuned_model.mlflow_run_id or "",
        "evaluation_run_id": model_evaluation.mlflow_run_id or "",
        "model_sha256": info.model_sha256,
        "log_mode": info.log_mode,
        "tracking_uri": mlflow_tracking.tracking_uri,
        "gate_passed": model_evaluation.gate_passed,
    }
    ui = mlflow_tracking.ui_base()
    if ui:
        metadata["mlflow_model_version_url"] = dg.MetadataValue.url(f"{ui}/#/models/{info.model_name}/versions/{info.version}")
        if info.run_id and info.experiment_id:
            metadata["mlflow_run_url"] = dg.MetadataValue.url(f"{ui}/#/experiments/{info.experiment_id}/runs/{info.run_id}")
    return dg.MaterializeResult(value=info, metadata=metadata, data_version=dg.DataVersion(f"v{info.version}-{info.model_sha256[:12]}"))
