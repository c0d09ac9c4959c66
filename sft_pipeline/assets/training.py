"""Fine-tuning: `fine_tuned_model`, trained in its own process by `python -m sft_pipeline.training`."""


import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pydantic

from sft_pipeline.assets.support import config_from_dataclass, domain_kwargs, png_markdown
from sft_pipeline.resources import MlflowTracking, PipelineStorage
from sft_pipeline.training import TrainingConfig

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
    track_with_mlflow=(bool, pydantic.Field(default=True, description="Log parameters and per-step metrics to MLflow.")),
)

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"


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


def run_training_process(cfg: TrainingConfig, workdir: Path, log) -> dict:
    """Run `python -m sft_pipeline.training` in a child process, streaming its output to `log`."""
    config_path = workdir / "training_config.json"
    result_path = workdir / "training_result.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    command = [sys.executable, "-m", "sft_pipeline.training", "--config", str(config_path), "--output-json", str(result_path)]
    log.info("launching: %s", " ".join(command))
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            if line:
                log.info(line)
    if process.returncode != 0:
        raise RuntimeError(f"training process exited with {process.returncode}; last output:\n" + "\n".join(tail))
    return json.loads(result_path.read_text())


@dg.asset(code_version=CODE_VERSION, group_name="models", kinds={"pytorch"}, pool="gpu", deps=["sft_dataset", "base_model"])
def fine_tuned_model(
    context: dg.AssetExecutionContext, config: FineTunedModelConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """The trained LoRA adapter (or full weights) and its training record."""
    workdir = storage.asset_dir("fine_tuned_model") / context.run_id
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = TrainingConfig(
        model_dir=storage.read_manifest("base_model")["path"],
        dataset_dir=storage.read_manifest("sft_dataset")["path"],
        output_dir=str(workdir),
        mlflow_tracking_uri=mlflow_tracking.tracking_uri if config.track_with_mlflow else None,
        mlflow_experiment=mlflow_tracking.experiment,
        mlflow_run_name=f"train-{context.run_id[:8]}",
        mlflow_tags={"dagster_run_id": context.run_id, "dagster_asset": "fine_tuned_model"},
        lora_target_modules="all-linear" if config.lora_target_modules == ["all-linear"] else list(config.lora_target_modules),
        **domain_kwargs(config, TrainingConfig, exclude=("lora_target_modules",)),
    )
    result = run_training_process(cfg, workdir, context.log)
    storage.write_manifest("fine_tuned_model", result)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(result["adapter_dir"] or result["model_dir"]),
            "method": result["method"],
            "train_loss": result["train_loss"],
            "eval_loss": result["eval_loss"],
            "steps": result["global_step"],
            "trainable_parameters": result["trainable_parameters"],
            "trainable_share": result["trainable_parameters"] / result["total_parameters"],
            "tokens_seen": result["tokens_seen"],
            "tokens_per_second": result["tokens_per_second"],
            "wall_time_s": result["train_runtime_s"],
            "mlflow_run_id": result.get("mlflow_run_id") or "",
            "loss_curve": loss_curve(result["history"]),
        }
    )
