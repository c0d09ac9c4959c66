"""The Dagster code location: everything under `sft_pipeline/defs/`, loaded the `dg` way.

`dagster ... -m sft_pipeline.definitions` and `workspace.yaml` point here; `dg check defs` and
`dg list defs` read the same folder through `[tool.dg]` in pyproject.toml.
"""

from pathlib import Path

import dagster as dg

from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage, RawDataFolder, pipeline_resources


def build_definitions(
    storage: PipelineStorage | None = None,
    mlflow_tracking: MlflowTracking | None = None,
    raw_data: RawDataFolder | None = None,
) -> dg.Definitions:
    """The pipeline's Definitions; tests pass their own storage, tracking and raw-data resources."""
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    if storage is None and mlflow_tracking is None and raw_data is None:
        return loaded
    return dg.Definitions(
        assets=loaded.assets,
        asset_checks=loaded.asset_checks,
        jobs=loaded.jobs,
        schedules=loaded.schedules,
        sensors=loaded.sensors,
        resources={**(loaded.resources or {}), **pipeline_resources(storage, mlflow_tracking, raw_data)},
    )


defs = build_definitions()
