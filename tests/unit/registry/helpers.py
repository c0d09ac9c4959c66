"""Shared arguments for the registry tests: a trained adapter's registration kwargs, fast bare versions."""

from __future__ import annotations

from pathlib import Path


def split_files(trained) -> dict[str, Path]:
    return {split: Path(trained.dataset_dir) / f"{split}.parquet" for split in ("train", "validation", "test")}


def common_kwargs(trained, accuracy: float) -> dict:
    return dict(
        metrics={"mmlu_accuracy": accuracy, "train_loss": trained.train_loss, "nan_metric": float("nan")},
        params={"method": "lora", "max_steps": 2},
        tags={"dagster_run_id": "run-1", "base_model_revision": "tiny-rev", "code_version.fine_tuned_model": "1"},
        promote_to="champion",
        promotion_metric="mmlu_accuracy",
        datasets=split_files(trained),
    )


def bare_versions(uri: str, name: str, scores: list[float]) -> None:
    """Versions without a logged model (fast): only the score tags promotion compares."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(name)
    for score in scores:
        client.create_model_version(name, source="file:///nonexistent", tags={"score.acc": repr(score)})
