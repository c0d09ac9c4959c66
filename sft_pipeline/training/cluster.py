"""What training on several machines needs from storage: every path a worker reads or writes reachable from every node.

A Ray Train worker may run on any node of the cluster, and rank 0 (which writes the adapter, the
training record and the MLflow run) on any of them. So with several nodes, the base model, the dataset,
the output folder (checkpoints, weights, result) and Ray Train's storage path must be on storage every
node mounts at the same path (NFS, Lustre, a CSI volume, a FUSE mount of object storage, ...) or, for
Ray's storage path, object storage (s3://, gs://); and MLflow must be a tracking server, not a SQLite
file on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sft_pipeline.training.config import TrainingConfig

# Filesystems that are (normally) the same on every machine that mounts them. Anything else (ext4, xfs,
# btrfs, overlay, tmpfs, ...) is taken as one machine's local disk.
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs",
                   "fuse.glusterfs", "wekafs", "panfs", "afs", "orangefs", "alluxio")
OBJECT_STORE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def filesystem_type(path: str | Path, mounts: str | Path = "/proc/mounts") -> str:
    """The type of the filesystem `path` lives on (the longest mount point above it), '' when unknown."""
    target = Path(os.path.abspath(path))
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return ""
    best, best_type = "", ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = _unescape(parts[1])
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, parts[2]
    return best_type


def is_shared_filesystem(fs_type: str) -> bool:
    return fs_type in SHARED_FS_TYPES or fs_type.startswith("fuse")  # s3fs, gcsfuse, mountpoint-s3, juicefs, ...


def worker_paths(cfg: TrainingConfig) -> dict[str, str]:
    """Field name -> path, for every path a Ray Train worker reads or writes."""
    paths = {"model_dir": cfg.model_dir, "dataset_dir": cfg.dataset_dir, "output_dir": cfg.output_dir}
    if cfg.ray_storage_path and not cfg.ray_storage_path.startswith(OBJECT_STORE_SCHEMES):
        paths["ray_storage_path"] = cfg.ray_storage_path
    for name in ("fsdp_config", "deepspeed"):
        if getattr(cfg, name):
            paths[name] = getattr(cfg, name)
    uri = cfg.mlflow_tracking_uri or ""
    if uri.startswith("sqlite:///"):
        paths["mlflow_tracking_uri"] = uri[len("sqlite:///"):]
    elif uri.startswith("file:") or (uri and "://" not in uri):
        paths["mlflow_tracking_uri"] = uri.removeprefix("file://").removeprefix("file:")
    return paths


def node_local_paths(cfg: TrainingConfig, fs_type: Callable[[str], str] = filesystem_type) -> dict[str, str]:
    """The worker paths (field -> 'path (fstype)') that are on one machine's local filesystem."""
    local = {}
    for name, path in worker_paths(cfg).items():
        kind = fs_type(path)
        if not is_shared_filesystem(kind):
            local[name] = f"{path} ({kind or 'unknown filesystem'})"
    return local


def check_cluster_storage(cfg: TrainingConfig, num_nodes: int,
                          fs_type: Callable[[str], str] = filesystem_type) -> None:
    """Refuse (ValueError naming the fields) a cluster of several nodes whose workers could not reach a path.

    One node: nothing to check. `check_shared_storage: false` skips the check (paths mounted on every
    node by means this check cannot see, e.g. the same hostPath volume on every Kubernetes node).
    """
    if num_nodes < 2 or not cfg.check_shared_storage:
        return
    local = node_local_paths(cfg, fs_type)
    if not local:
        return
    listed = "; ".join(f"{name}: {where}" for name, where in local.items())
    hints = []
    if "mlflow_tracking_uri" in local:
        hints.append("point MLFLOW_TRACKING_URI (the mlflow_tracking resource) at an MLflow tracking server")
    if local.keys() - {"mlflow_tracking_uri"}:
        hints.append("put the artifact root (PipelineStorage.root / SFT_PIPELINE_HOME) and the base model on storage "
                     "every node mounts at the same path (NFS, Lustre, a shared volume) and ray_storage_path there or "
                     "on object storage (s3://...)")
    raise ValueError(
        f"TrainingConfig.check_shared_storage: the Ray cluster has {num_nodes} nodes and a worker may run on any of "
        f"them, but these paths are local to one machine: {listed}. To fix: {'; '.join(hints)}; or set "
        "check_shared_storage: false if they are mounted on every node. See docs/scaling.md.")
