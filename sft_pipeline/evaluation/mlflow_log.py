"""MLflow logging of an evaluation: metric names of a summary, and one run with params, metrics, tables and the question subset.

mlflow is imported lazily, inside `log_evaluation_run`.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pandas as pd


def flatten_metrics(prefix: str, summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names for an MMLU summary: accuracy, CI bounds, per subject and category."""
    out: dict[str, float] = {}
    for key in ("accuracy", "macro_accuracy"):
        if summary.get(key) is not None:
            out[f"{prefix}{key}"] = float(summary[key])
        ci = summary.get(f"{key}_ci")
        if ci:
            out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = float(ci[0]), float(ci[1])
    for group in ("subject", "category"):
        for name, value in (summary.get(f"per_{group}") or {}).items():
            out[f"{prefix}{group}/{name}"] = float(value["accuracy"])
    return out


def log_evaluation_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float | None],
    tables: dict[str, pd.DataFrame] | None = None,
    documents: dict[str, dict] | None = None,
    tags: dict[str, str] | None = None,
    dataset: pd.DataFrame | None = None,
    dataset_name: str = "mmlu_subset",
    dataset_digest: str | None = None,
) -> str:
    """One MLflow run holding the params, metrics, tables (`log_table`), JSON documents and the
    evaluated question subset as a dataset input. Returns the run id. Imports mlflow lazily."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    from sft_pipeline.tracking import client as tracking_client, configure

    experiment_id = configure(tracking_uri, experiment)
    client = tracking_client(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        clean_metrics = [Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()
                         if v is not None and math.isfinite(float(v))]
        clean_params = [Param(_metric_key(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, max(len(clean_metrics), len(clean_params)), 900):
            client.log_batch(run_id, metrics=clean_metrics[start:start + 900], params=clean_params[start:start + 900],
                             tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()] if start == 0 else [],
                             synchronous=True)
        for name, frame in (tables or {}).items():
            client.log_table(run_id, data=_json_safe_frame(frame), artifact_file=name)
        for name, document in (documents or {}).items():
            client.log_dict(run_id, document, name)
        if dataset is not None:
            ds = mlflow.data.from_pandas(_json_safe_frame(dataset), name=dataset_name, digest=dataset_digest)
            client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "evaluation")])])
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _metric_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; map anything else to _.
    return "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in str(name))


def _json_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, (list, tuple, dict)) or hasattr(v, "tolist")).any():
            out[column] = out[column].map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=str))
    return out
