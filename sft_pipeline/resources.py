"""Dagster resources: where artifacts live and which MLflow tracking store to use."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg


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

    tracking_uri: str = f"sqlite:///{project_home() / 'mlflow.db'}"
    experiment: str = "sft_pipeline"
    registered_model_name: str = "sft_pipeline_model"
