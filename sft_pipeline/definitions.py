"""The Dagster code location: every asset, check, job, schedule, sensor and resource of the pipeline."""

import dagster as dg

from sft_pipeline.assets import augmentation, curation, datasets, evaluation, models, registry, training
from sft_pipeline.jobs import JOBS, SCHEDULES, SENSORS
from sft_pipeline.resources import MlflowTracking, PipelineStorage, RawDataFolder

STAGE_MODULES = [curation, augmentation, models, datasets, training, evaluation, registry]


def build_definitions(
    storage: PipelineStorage | None = None,
    mlflow_tracking: MlflowTracking | None = None,
    raw_data: RawDataFolder | None = None,
) -> dg.Definitions:
    """The pipeline's Definitions; tests pass their own storage, tracking and raw-data resources."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules(STAGE_MODULES),
        asset_checks=dg.load_asset_checks_from_modules(STAGE_MODULES),
        jobs=JOBS,
        schedules=SCHEDULES,
        sensors=SENSORS,
        resources={
            "storage": storage or PipelineStorage(),
            "mlflow_tracking": mlflow_tracking or MlflowTracking(),
            "raw_data": raw_data or RawDataFolder(),
        },
    )


defs = build_definitions()
