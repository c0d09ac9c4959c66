"""The training's MLflow run: params, per-step metrics, dataset inputs, artifacts beside the DB."""

from __future__ import annotations

import json

import pytest

from sft_pipeline.training import train
from tests.unit.training.helpers import make_cfg


def test_mlflow_logs_per_step_metrics(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=4,
               mlflow_tracking_uri=uri, mlflow_run_name="tiny", mlflow_tags={"dagster_run_id": "abc123"})
    r = train(cfg)
    assert r.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.data.tags["dagster_run_id"] == "abc123"
    assert run.data.params["method"] == "lora" and run.data.params["max_steps"] == "4"
    train_loss = client.get_metric_history(r.mlflow_run_id, "train_loss")
    assert sorted(m.step for m in train_loss) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "learning_rate")] == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(r.mlflow_run_id, "eval_loss")) == [2, 4]
    assert run.data.metrics["final_train_loss"] == pytest.approx(r.train_loss)
    assert run.data.tags["sft_pipeline.training_fingerprint"] == r.fingerprint
    # throughput and memory per logged step (step 1 has no previous log to measure from on a resume only)
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "peak_memory_mib")][:4] == [1, 2, 3, 4]
    assert all(m.value > 0 for m in client.get_metric_history(r.mlflow_run_id, "tokens_per_second"))
    assert run.data.metrics["trainable_share"] == pytest.approx(r.trainable_parameters / r.total_parameters)
    # the training data as mlflow.data dataset inputs, with their split as context
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"sft_dataset_train", "sft_dataset_validation"}
    assert {t.value for t in inputs["sft_dataset_train"].tags} == {"train"}
    assert json.loads(inputs["sft_dataset_train"].dataset.profile)["num_rows"] == 24
    # artifacts live beside the DB, not in the current directory
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert "training_record.json" in [f.path for f in client.list_artifacts(r.mlflow_run_id)]
