"""The training fingerprint: a digest of everything that decides the trained weights (keys resume and the output folder)."""

from __future__ import annotations

from pathlib import Path

from sft_pipeline.hashing import file_digest, files_digest, json_digest, short
from sft_pipeline.training.config import TrainingConfig

# Fields that do not change what is trained: left out of the fingerprint that keys resume.
NON_TRAINING_FIELDS = ("output_dir", "mlflow_tracking_uri", "mlflow_experiment", "mlflow_run_name", "mlflow_tags",
                       "resume", "launcher", "logging_steps", "peak_tflops", "use_gpu", "ray_address",
                       "ray_resources_per_worker", "ray_storage_path", "ray_max_failures", "check_shared_storage")
# Fields added after trainings were keyed: left out while at the value that trains as before they existed, so
# those keys (and the finished runs and checkpoints they name) stay valid; any other value counts.
KEYED_WHEN_SET = {"fsdp": False, "fsdp_config": None, "deepspeed": None, "accelerate_config_file": None,
                  "lora_last_layers": 0}
# What training reads from the dataset folder (test.parquet is evaluation's).
DATASET_FILES = ("train.parquet", "validation.parquet")


def dataset_content_hash(dataset_dir: str | Path) -> str:
    """Digest of the train/validation Parquet files, names and bytes (what training reads)."""
    root = Path(dataset_dir)
    return files_digest([root / name for name in DATASET_FILES if (root / name).is_file()], root=root)


def model_identity_hash(model_dir: str | Path) -> str:
    """Digest of the base model's resolved path, config.json content and every file's size and mtime.

    Sizes and mtimes rather than bytes: a base model can be tens of GB, and the fingerprint is
    computed in the Dagster process before every launch.
    """
    root = Path(model_dir).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    stats = {p.relative_to(root).as_posix(): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files}
    config = root / "config.json"
    return json_digest({"path": str(root), "files": stats,
                        "config": file_digest(config) if config.is_file() else None})


def training_fingerprint(cfg: TrainingConfig) -> str:
    """Short digest of everything that decides the trained weights: training fields, dataset bytes, base model.

    Output folder, tracking and launcher fields are left out, so a rerun of the same training under
    another Dagster run (or by hand) finds the same checkpoints. 16 hex: it names the output folder.
    """
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in NON_TRAINING_FIELDS and not (k in KEYED_WHEN_SET and v == KEYED_WHEN_SET[k])}
    payload = {"config": fields, "dataset": dataset_content_hash(cfg.dataset_dir),
               "model": model_identity_hash(cfg.model_dir)}
    return short(json_digest(payload))
