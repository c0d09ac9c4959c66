"""MLflow setup shared by training, evaluation and the registry: clients, the experiment, runs, fluent URIs.

mlflow is imported inside the functions: training and evaluation run on GPU machines without it.

Nothing here changes MLflow's process-wide state for longer than a `with use_tracking_uri(...)`
block: `mlflow.set_tracking_uri` / `set_registry_uri` also export MLFLOW_TRACKING_URI /
MLFLOW_REGISTRY_URI and cannot be undone through the public API, so a process that set them once
(a Dagster step, a test) would pin every later client to that store.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local artifact folder next to a SQLite tracking DB (``<db dir>/mlartifacts``), else None.

    MLflow's default for a database backend is ``./mlruns`` relative to the *current working
    directory*, which scatters artifacts depending on who launched the process (Dagster, a
    shell, pytest). Pinning it beside the DB keeps the store self-contained.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or other backend decides its own artifact store
    return (_sqlite_path(tracking_uri).resolve().parent / "mlartifacts").as_uri()


def _sqlite_path(tracking_uri: str) -> Path:
    return Path(tracking_uri[len("sqlite:///"):])  # "sqlite:////abs" -> "/abs"; "sqlite:///rel" -> "rel"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


def client(tracking_uri: str):
    """An `MlflowClient` whose tracking and model-registry store are both `tracking_uri`."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def configure(tracking_uri: str, experiment: str) -> str:
    """The id of experiment `experiment` in `tracking_uri`, created (or restored if deleted) when needed.

    A SQLite store gets its folder created and the experiment's artifacts beside the DB
    (`artifact_root_for`). Safe against a parallel process creating the same experiment.
    """
    if tracking_uri.startswith("sqlite:///"):
        _sqlite_path(tracking_uri).resolve().parent.mkdir(parents=True, exist_ok=True)
    mlflow_client = client(tracking_uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root_for(tracking_uri)
    location = f"{root}/{_safe_name(experiment)}" if root else None
    try:
        return mlflow_client.create_experiment(experiment, artifact_location=location)
    except Exception:
        # Another process (a parallel Dagster step) may have created it in the meantime.
        exp = mlflow_client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str | None = None,
              tags: dict[str, Any] | None = None) -> str:
    """Create a RUNNING run in `experiment` (see `configure`) with `tags`; returns its run id.

    Through the client, so a caller's own active fluent run is never touched; end it with
    ``client(tracking_uri).set_terminated(run_id, status)``.
    """
    experiment_id = configure(tracking_uri, experiment)
    run = client(tracking_uri).create_run(experiment_id, run_name=run_name,
                                          tags={str(k): str(v) for k, v in (tags or {}).items()})
    return run.info.run_id


@contextlib.contextmanager
def use_tracking_uri(tracking_uri: str) -> Iterator[Any]:
    """Point MLflow's fluent API (tracking and registry) at `tracking_uri` for the block, yielding `mlflow`;
    afterwards the module globals and environment variables are exactly as they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in env_names}
    saved_globals = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved_globals
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
