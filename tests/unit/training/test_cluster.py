"""What a cluster of several nodes needs from storage: paths every worker reaches, an MLflow server."""

from __future__ import annotations

import pytest

from sft_pipeline.training import TrainingConfig, check_cluster_storage, filesystem_type, node_local_paths
from sft_pipeline.training.ray_train import resolve_use_gpu

MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
nfs.example:/export /mnt/shared nfs4 rw,vers=4.2 0 0
/dev/nvme0n1 /mnt/shared/scratch ext4 rw 0 0
mountpoint-s3 /mnt/s3 fuse rw 0 0
"""


def test_filesystem_type_is_that_of_the_deepest_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert filesystem_type("/mnt/shared/artifacts/x", mounts) == "nfs4"
    assert filesystem_type("/mnt/shared/scratch/x", mounts) == "ext4"
    assert filesystem_type("/mnt/sharedother", mounts) == "overlay"  # a prefix of the name is not a parent
    assert filesystem_type("/tmp/x", mounts) == "tmpfs"
    assert filesystem_type("/mnt/s3/bucket", mounts) == "fuse"


def _cfg(**kw) -> TrainingConfig:
    base = dict(model_dir="/mnt/shared/base", dataset_dir="/mnt/shared/data", output_dir="/mnt/shared/out",
                launcher="ray", num_processes=4, mlflow_tracking_uri="http://mlflow:5000")
    return TrainingConfig(**{**base, **kw})


def test_several_nodes_refuse_paths_local_to_one_machine(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    fs = lambda path: filesystem_type(path, mounts)  # noqa: E731
    check_cluster_storage(_cfg(), num_nodes=3, fs_type=fs)  # everything shared, MLflow a server
    check_cluster_storage(_cfg(ray_storage_path="s3://bucket/ray"), num_nodes=3, fs_type=fs)
    local = _cfg(output_dir="/tmp/out", mlflow_tracking_uri="sqlite:////tmp/mlflow.db")
    assert set(node_local_paths(local, fs)) == {"output_dir", "mlflow_tracking_uri"}
    check_cluster_storage(local, num_nodes=1, fs_type=fs)  # one machine: every worker sees its disk
    with pytest.raises(ValueError, match="check_shared_storage") as error:
        check_cluster_storage(local, num_nodes=2, fs_type=fs)
    text = str(error.value)
    assert "2 nodes" in text and "output_dir: /tmp/out (tmpfs)" in text and "MLFLOW_TRACKING_URI" in text
    with pytest.raises(ValueError, match="ray_storage_path"):
        check_cluster_storage(_cfg(ray_storage_path="/mnt/shared/scratch/ray"), num_nodes=2, fs_type=fs)
    check_cluster_storage(TrainingConfig(**{**local.to_dict(), "check_shared_storage": False}), num_nodes=2, fs_type=fs)


def test_ray_workers_use_gpus_when_the_cluster_has_one_each():
    assert resolve_use_gpu(_cfg(), {"CPU": 64.0, "GPU": 4.0}) is True
    assert resolve_use_gpu(_cfg(), {"CPU": 64.0, "GPU": 2.0}) is False
    assert resolve_use_gpu(_cfg(use_gpu=False), {"GPU": 8.0}) is False
