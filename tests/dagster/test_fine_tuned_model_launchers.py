"""fine_tuned_model through each launcher: 2 torchrun ranks, and a Ray job whose Ray Train runs 2 workers on a
local Ray cluster; both report what a local run reports (one materialization, its logs, metadata, data version)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.hashing import model_digest
from tests.dagster.conftest import materialize_with_stubs
from tests.dagster.test_fine_tuned_model import _stubs
from tests.unit.training.helpers import write_tiny_sft_dataset

# Same global batch of 4 rows per step: one process x 4, or 2 ranks x 2 (batching 'padded': the same rows per
# step, see tests/unit/training/test_distributed.py).
COMMON = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3, "batching": "padded"}
LOCAL = {**COMMON, "per_device_train_batch_size": 4}
TWO_RANKS = {**COMMON, "per_device_train_batch_size": 2, "num_processes": 2}


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory):
    return write_tiny_sft_dataset(tiny_model_dir, tmp_path_factory.mktemp("launch_data"), n_train=16, n_val=0, n_test=0)


def _materialize(tiny_model_dir, data_dir, root: Path, config: dict):
    import dagster as dg

    storage = PipelineStorage(root=str(root / "artifacts"))
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_with_stubs(["fine_tuned_model"], _stubs(tiny_model_dir, data_dir), storage, tracking,
                                    {"ops": {"fine_tuned_model": {"config": config}}}, instance, raise_on_error=True)
    (mat,) = result.asset_materializations_for_node("fine_tuned_model")
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    return result, mat, messages, tracking


def _check_like_local(local_mat, mat, messages, tracking, run_id, launcher: str, extra: frozenset = frozenset()):
    """The same metadata as a local materialization, the loss of one process on the same global batch, rank 0 alone."""
    from mlflow import MlflowClient

    meta = mat.metadata
    assert set(meta) == set(local_mat.metadata) | {"replicas_identical"} | extra
    assert meta["launcher"].value == launcher and meta["num_processes"].value == 2
    assert meta["replicas_identical"].value is True
    assert local_mat.metadata["launcher"].value == "local" and local_mat.metadata["num_processes"].value == 1
    assert meta["train_loss"].value == pytest.approx(local_mat.metadata["train_loss"].value, rel=1e-5)
    assert meta["mean_train_loss"].value == pytest.approx(local_mat.metadata["mean_train_loss"].value, rel=1e-5)
    assert meta["tokens_seen"].value == local_mat.metadata["tokens_seen"].value
    weights = Path(meta["path"].path)
    assert mat.tags["dagster/data_version"] == model_digest(weights)
    assert meta["steps"].value == 4 and math.isfinite(meta["train_loss"].value)
    assert meta["loss_curve"].value.startswith("![plot](data:image/png;base64,")
    # rank 0's step lines reached the run's event log, once each
    assert sum("step 4/4" in m and "train_loss=" in m for m in messages) == 1
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.experiment).experiment_id])
    assert run.info.run_id == meta["mlflow_run_id"].value and run.info.status == "FINISHED"
    assert run.data.tags["dagster_run_id"] == run_id


@pytest.fixture(scope="module")
def local_materialization(tiny_model_dir, data_dir, tmp_path_factory):
    return _materialize(tiny_model_dir, data_dir, tmp_path_factory.mktemp("local"), LOCAL)[1]


@pytest.mark.slow
def test_asset_trains_on_two_torchrun_ranks(tiny_model_dir, data_dir, tmp_path, local_materialization):
    result, mat, messages, tracking = _materialize(tiny_model_dir, data_dir, tmp_path, {**TWO_RANKS, "launcher": "torchrun"})
    assert any("torch.distributed.run --standalone" in m for m in messages)
    _check_like_local(local_materialization, mat, messages, tracking, result.run_id, "torchrun")


@pytest.mark.slow
def test_asset_trains_on_ray_train_workers_of_a_local_ray_cluster(tiny_model_dir, data_dir, tmp_path, monkeypatch,
                                                                 local_materialization):
    """Start a 2-CPU Ray cluster, materialize through the 'ray' launcher (PipesRayJobClient -> Ray job ->
    TorchTrainer with 2 workers), check what comes back, stop the cluster with nothing left running."""
    pytest.importorskip("ray.train", reason="launcher 'ray' needs the extra: pip install -e '.[ray]'")
    pytest.importorskip("dagster_ray", reason="launcher 'ray' needs the extra: pip install -e '.[ray]'")
    from tests.ray_cluster import LocalRayCluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the cluster runs without token auth; so does its client here
    cluster = LocalRayCluster(num_cpus=2)
    try:
        cluster.start()
        result, mat, messages, tracking = _materialize(
            tiny_model_dir, data_dir, tmp_path, {**TWO_RANKS, "launcher": "ray", "ray_address": cluster.address})
        assert any("submitting Ray job" in m for m in messages)
        assert any("Ray Train: 2 workers (use_gpu=False" in m for m in messages)  # the driver's log, through Pipes
        _check_like_local(local_materialization, mat, messages, tracking, result.run_id, "ray",
                          extra=frozenset({"Ray Job ID"}))  # dagster-ray's link to the job
        assert mat.metadata["device"].value == "cpu"
    finally:
        left = cluster.stop()
    assert left == [], f"Ray processes still running after the cluster was stopped: {left}"
