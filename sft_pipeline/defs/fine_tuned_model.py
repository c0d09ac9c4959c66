"""Fine-tuning: `fine_tuned_model`, trained in its own process(es) through Dagster Pipes.

The asset resolves paths from its typed inputs and tracking from a resource, keys the output folder by
the training fingerprint (so a rematerialization of the same training resumes from its last checkpoint,
or reuses the finished run), launches `python -m sft_pipeline.training` (launcher 'local', 'torchrun' or
'accelerate': `PipesSubprocessClient`; 'ray': a Ray job through dagster-ray's `PipesRayJobClient`), and
returns the training record as its hand-off. Every launcher reports the same logs, metadata and data version.
"""

import dataclasses
import json
import os
import shlex
from pathlib import Path

import dagster as dg
import pydantic

from sft_pipeline.defs.metadata import config_from_dataclass, domain_kwargs, png_markdown
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.tokenization import SftDatasetInfo
from sft_pipeline.training import (
    TrainingConfig,
    TrainingResult,
    find_finished_run,
    launch_command,
    materialization_metadata,
    ray_job_params,
    training_fingerprint,
)

# Paths and tracking come from upstream assets and resources, not from the user.
_DERIVED = ("model_dir", "dataset_dir", "output_dir", "mlflow_tracking_uri", "mlflow_experiment", "mlflow_run_name", "mlflow_tags")

FineTunedModelConfig = config_from_dataclass(
    TrainingConfig,
    "FineTunedModelConfig",
    # Dagster config has no str-or-list type: take a list, where ["all-linear"] means every linear layer.
    exclude=(*_DERIVED, "lora_target_modules"),
    lora_target_modules=(
        list[str],
        pydantic.Field(default=["all-linear"], description="Modules to adapt: ['all-linear'] or names like ['q_proj', 'v_proj']."),
    ),
    track_with_mlflow=(bool, pydantic.Field(default=True, description="Log parameters, per-step metrics and dataset inputs to MLflow.")),
)

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "4"


def loss_curve(history: list[dict]) -> dg.MetadataValue:
    """Training and validation loss against steps, as an inline plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    evals = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    if train:
        axis.plot(*zip(*train), label="train loss")
    if evals:
        axis.plot(*zip(*evals), marker="o", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    return png_markdown(figure)


def training_config_for(config, storage: PipelineStorage, mlflow_tracking: MlflowTracking, run_id: str,
                        sft_dataset: SftDatasetInfo, base_model: BaseModelInfo) -> TrainingConfig:
    """The domain config: user fields + upstream paths, an output folder keyed by the training fingerprint, tracking."""
    probe = TrainingConfig(
        model_dir=base_model.path,
        dataset_dir=sft_dataset.path,
        output_dir="(set below)",
        lora_target_modules="all-linear" if config.lora_target_modules == ["all-linear"] else list(config.lora_target_modules),
        **domain_kwargs(config, TrainingConfig, exclude=("lora_target_modules",)),
    )
    fingerprint = training_fingerprint(probe)
    return dataclasses.replace(
        probe,
        output_dir=str(storage.asset_dir("fine_tuned_model") / fingerprint),
        mlflow_tracking_uri=mlflow_tracking.tracking_uri if config.track_with_mlflow else None,
        mlflow_experiment=mlflow_tracking.experiment,
        mlflow_run_name=f"train-{fingerprint[:8]}",
        mlflow_tags={
            "dagster_run_id": run_id,
            "dagster_asset": "fine_tuned_model",
            "dagster_code_version": CODE_VERSION,
            "dagster_sft_dataset_data_version": sft_dataset.content_hash,
            "dagster_base_model_data_version": base_model.content_hash or base_model.revision,
        },
    )


def _ray_job(cfg: TrainingConfig, context: dg.AssetExecutionContext, config_path: Path, result_path: Path, env: dict):
    """Submit the training as a Ray job through dagster-ray's Pipes client (launcher 'ray')."""
    try:
        from dagster_ray import PipesRayJobClient
    except ImportError as exc:
        raise RuntimeError("TrainingConfig.launcher: 'ray' needs dagster-ray and Ray Train: pip install 'sft_pipeline[ray]'") from exc
    storage = type(context.instance.run_storage).__name__
    if "Postgres" not in storage:
        context.log.warning(f"Dagster's instance keeps runs in {storage}: fine on one machine; a deployment that trains on a cluster "
                            "keeps them in Postgres (docs/scaling.md)")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    params = ray_job_params(cfg, config_path, result_path, env_vars=env)
    context.log.info(f"submitting Ray job to {address or 'the local Ray cluster'}: {params['entrypoint']}")
    return PipesRayJobClient(address=address, poll_interval=0.5).run(context=context, submit_job_params=params,
                                                                     extras={"training_fingerprint": Path(cfg.output_dir).name})


def run_training_process(cfg: TrainingConfig, context: dg.AssetExecutionContext) -> tuple[dict, dg.MaterializeResult]:
    """Launch training (one process, torchrun, accelerate launch, or a Ray job) through Dagster Pipes; the result JSON and the reported materialization."""
    workdir = Path(cfg.output_dir)
    config_path = workdir / "training_config.json"
    result_path = workdir / "training_result.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    result_path.unlink(missing_ok=True)
    # The child imports sft_pipeline from this checkout even when it is not installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p), "TOKENIZERS_PARALLELISM": "false"}
    error_path = result_path.with_suffix(".error.txt")
    try:
        if cfg.launcher == "ray":
            invocation = _ray_job(cfg, context, config_path, result_path, env)
        else:
            command = launch_command(cfg, config_path, result_path)
            context.log.info("launching: %s", shlex.join(command))
            invocation = dg.PipesSubprocessClient(env=env).run(command=command, context=context, extras={"training_fingerprint": workdir.name})
    except Exception as exc:  # dagster raises DagsterPipesExecutionError (not public API) on a non-zero exit
        if error_path.is_file():  # the child's own one-line reason beats "process failed with code 1"
            raise RuntimeError(f"training failed: {error_path.read_text()}") from exc
        raise
    reported = invocation.get_materialize_result()
    return json.loads(result_path.read_text()), reported


@dg.asset(code_version=CODE_VERSION, group_name="models", kinds={"pytorch"}, pool="gpu")
def fine_tuned_model(
    context: dg.AssetExecutionContext, config: FineTunedModelConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking,
    sft_dataset: SftDatasetInfo, base_model: BaseModelInfo,
) -> dg.MaterializeResult[TrainingResult]:
    """The trained LoRA/QLoRA adapter (or full/partially frozen weights) and its training record.

    Trained in its own process(es) through Dagster Pipes: one process, torchrun ranks on this node, or
    Ray Train workers on a Ray cluster (config `launcher`, docs/scaling.md); a rematerialization with the
    same configuration, data and base model resumes from the last checkpoint (or reuses the finished run).
    """
    cfg = training_config_for(config, storage, mlflow_tracking, context.run_id, sft_dataset, base_model)
    workdir = Path(cfg.output_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    finished = find_finished_run(cfg)
    if finished is not None:
        # Same configuration, data and base model, already trained: no process, no GPU time.
        context.log.info("training %s already finished at step %d in %s; reusing it", workdir.name, finished.global_step, workdir)
        result = finished
        reported_metadata, data_version = materialization_metadata(finished), dg.DataVersion(finished.weights_hash)
    else:
        record, reported = run_training_process(cfg, context)
        result = TrainingResult(**{f.name: record[f.name] for f in dataclasses.fields(TrainingResult) if f.name in record})
        reported_metadata, data_version = reported.metadata or {}, reported.data_version or dg.DataVersion(result.weights_hash)
    metadata = {
        **reported_metadata,
        "path": dg.MetadataValue.path(result.weights_dir),
        "output_dir": dg.MetadataValue.path(result.output_dir),
        "loss_curve": loss_curve(result.history),
        "training_config": dg.MetadataValue.json(cfg.to_dict()),
    }
    return dg.MaterializeResult(value=result, metadata=metadata, data_version=data_version)
