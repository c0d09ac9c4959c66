"""MLflow setup: the experiment is created once (artifacts beside a SQLite DB), runs carry tags, fluent URIs are restored."""

from __future__ import annotations

import os

from sft_pipeline import tracking


def test_configure_creates_once_beside_the_db_and_restores_a_deleted_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    experiment_id = tracking.configure(uri, "sft pipeline")
    assert tracking.configure(uri, "sft pipeline") == experiment_id
    client = tracking.client(uri)
    assert client.get_experiment(experiment_id).artifact_location == \
        f"{(tmp_path / 'store' / 'mlartifacts').as_uri()}/sft_pipeline"
    client.delete_experiment(experiment_id)
    assert tracking.configure(uri, "sft pipeline") == experiment_id
    assert client.get_experiment(experiment_id).lifecycle_stage == "active"
    assert tracking.artifact_root_for("http://mlflow:5000") is None


def test_start_run_tags_the_run_and_leaves_fluent_state_alone(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    run_id = tracking.start_run(uri, "exp", run_name="r", tags={"stage": "training", "n": 1})
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "r"
    assert run.data.tags["stage"] == "training" and run.data.tags["n"] == "1"
    assert mlflow.active_run() is None
    with tracking.use_tracking_uri(uri) as fluent:
        assert fluent.get_tracking_uri() == uri and fluent.get_registry_uri() == uri
    after = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    assert after == before
