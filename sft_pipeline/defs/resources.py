"""Dagster resources: where artifacts live, which MLflow tracking store to use, which folder brings raw data."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pydantic


def project_home() -> Path:
    """The project folder: `SFT_PIPELINE_HOME` if set, else the current directory."""
    return Path(os.environ.get("SFT_PIPELINE_HOME", os.getcwd())).resolve()


def default_artifact_root() -> str:
    return str(project_home() / "artifacts")


class PipelineStorage(dg.ConfigurableResource):
    """Local folder that holds every asset's persisted output, one sub-folder per asset.

    Assets write their outputs into immutable folders under `asset_dir(name)` (see
    `sft_pipeline.outputs`) and hand them on through the I/O manager, never through fixed file names.
    """

    root: str = pydantic.Field(default_factory=default_artifact_root, description="Artifact root (env SFT_PIPELINE_HOME/artifacts).")

    def asset_dir(self, asset_name: str) -> Path:
        path = Path(self.root) / asset_name
        path.mkdir(parents=True, exist_ok=True)
        return path


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / 'mlflow.db'}"


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking store and registry: a SQLite file in the project folder by default."""

    # MLFLOW_TRACKING_URI moves the whole pipeline to a tracking server without code changes.
    tracking_uri: str = pydantic.Field(default_factory=lambda: default_tracking_uri(), description="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///<project>/mlflow.db).")
    experiment: str = "sft_pipeline"
    registered_model_name: str = "sft_pipeline_model"
    ui_url: str = pydantic.Field(
        default="",
        description="Base URL of the MLflow UI (e.g. http://127.0.0.1:5000) for links in asset metadata; "
        "empty: the tracking URI itself when it is http(s), else no links.",
    )

    def ui_base(self) -> str:
        """Where the MLflow UI for this store is, or '' when unknown."""
        if self.ui_url:
            return self.ui_url.rstrip("/")
        return self.tracking_uri.rstrip("/") if self.tracking_uri.startswith(("http://", "https://")) else ""


def default_raw_dir() -> str:
    """`SFT_PIPELINE_RAW_DIR` if set, else `<project>/data/raw`."""
    return os.environ.get("SFT_PIPELINE_RAW_DIR") or str(project_home() / "data" / "raw")


class RawDataFolder(dg.ConfigurableResource):
    """The folder where new raw instruction files land; the sensor and the nightly schedule watch it.

    When it holds matching files, retraining runs ingest exactly those files (plus the packaged
    seed set if `include_seed_data`); when it is empty, the packaged seed set is used.
    """

    path: str = pydantic.Field(default_factory=default_raw_dir, description="Folder watched for new raw data files (env SFT_PIPELINE_RAW_DIR; default <project>/data/raw).")
    patterns: list[str] = pydantic.Field(
        default_factory=lambda: ["*.jsonl", "*.json", "*.csv", "*.parquet", "*.jsonl.gz", "*.json.gz", "*.csv.gz"],
        description="Glob patterns (relative to the folder, searched recursively) of the files that count as raw data.",
    )
    include_seed_data: bool = pydantic.Field(default=False, description="Also ingest the packaged seed set when the folder has files.")

    def files(self) -> list[Path]:
        """The matching files, sorted by relative name (hidden and partial `.tmp` files ignored)."""
        root = Path(self.path)
        if not root.is_dir():
            return []
        found = {p for pattern in self.patterns for p in root.rglob(pattern) if p.is_file()}
        return sorted((p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)),
                      key=lambda p: p.relative_to(root).as_posix())


def pipeline_resources(
    storage: PipelineStorage | None = None,
    mlflow_tracking: MlflowTracking | None = None,
    raw_data: RawDataFolder | None = None,
) -> dict[str, object]:
    """Every resource the assets need; the hand-off I/O manager stores under the same root as `storage`."""
    from sft_pipeline.defs.io_manager import HandoffIOManager

    storage = storage or PipelineStorage()
    return {
        "storage": storage,
        "mlflow_tracking": mlflow_tracking or MlflowTracking(),
        "raw_data": raw_data or RawDataFolder(),
        "io_manager": HandoffIOManager(root=storage.root),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=pipeline_resources())
