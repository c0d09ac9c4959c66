"""Dagster resources: where artifacts live and which MLflow tracking store to use."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pydantic


def project_home() -> Path:
    """The project folder: `SFT_PIPELINE_HOME` if set, else the current directory."""
    return Path(os.environ.get("SFT_PIPELINE_HOME", os.getcwd())).resolve()


class PipelineStorage(dg.ConfigurableResource):
    """Local folder that holds every asset's persisted output, one sub-folder per asset."""

    root: str = str(project_home() / "artifacts")

    def asset_dir(self, asset_name: str) -> Path:
        path = Path(self.root) / asset_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_manifest(self, asset_name: str, manifest: dict) -> Path:
        """Record where an asset's latest output is, for the assets downstream of it."""
        import json

        path = self.asset_dir(asset_name) / "manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(path)
        return path

    def read_manifest(self, asset_name: str) -> dict:
        """The manifest of an asset's latest output; a clear error if it was never materialized here."""
        import json

        path = Path(self.root) / asset_name / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: materialize the asset {asset_name!r} first (storage root {self.root})")
        return json.loads(path.read_text())


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking store and registry: a SQLite file in the project folder by default."""

    # MLFLOW_TRACKING_URI moves the whole pipeline to a tracking server without code changes.
    tracking_uri: str = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / 'mlflow.db'}"
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
        default_factory=lambda: ["*.jsonl", "*.json", "*.csv", "*.parquet"],
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
