"""Lineage in MLflow: dataset inputs (one per split) and two-way links between training, evaluation and registration runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_pipeline.hashing import file_digest, short


def _dataset_inputs(datasets: dict[str, str | Path]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """mlflow.data datasets (one per split, digest = file sha256) and a plain summary of each."""
    import mlflow.data
    import pandas as pd

    objects, summary = {}, {}
    for split, path in (datasets or {}).items():
        path = Path(path)
        if not path.is_file():
            continue
        sha = file_digest(path)
        frame = pd.read_parquet(path)
        # MLflow shows a dataset digest in its UI; 16 hex is what fits there.
        objects[split] = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=split, digest=short(sha))
        summary[split] = {"path": str(path.resolve()), "sha256": sha, "rows": len(frame)}
    return objects, summary


def _log_inputs_to_run(client, run_id: str | None, datasets: dict[str, Any], splits: tuple[str, ...]) -> None:
    """Attach the dataset inputs for `splits` to an existing (possibly finished) run."""
    if not run_id:
        return
    from mlflow.entities import DatasetInput, InputTag

    inputs = [
        DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=split)])
        for split, ds in datasets.items() if split in splits
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _link_runs(client, registration_run_id, model_name, version, training_run_id, evaluation_run_id, dataset_objects) -> None:
    """Two-way links between the training, evaluation and registration runs, and dataset inputs on each."""
    link = {"sft_pipeline.registered_model": model_name, "sft_pipeline.registered_version": str(version),
            "sft_pipeline.registration_run_id": registration_run_id}
    for run_id, splits in ((training_run_id, ("train", "validation")), (evaluation_run_id, ("test",))):
        if not run_id:
            continue
        try:
            for k, v in link.items():
                client.set_tag(run_id, k, v)
            if run_id == evaluation_run_id and training_run_id and run_id != training_run_id:
                client.set_tag(run_id, "training_run_id", training_run_id)
                if "mlflow.parentRunId" not in client.get_run(run_id).data.tags:
                    client.set_tag(run_id, "mlflow.parentRunId", training_run_id)
            _log_inputs_to_run(client, run_id, dataset_objects, splits)
        except Exception as exc:  # a deleted or foreign run must not fail the registration
            client.set_tag(registration_run_id, f"sft_pipeline.link_error.{run_id[:8]}", str(exc)[:500])
