"""The Dagster code location: every asset, check, job, schedule and resource of the pipeline."""

import dagster as dg

from sft_pipeline.assets import augmentation, curation, datasets, evaluation, models, registry, training
from sft_pipeline.jobs import nightly_retraining_schedule, sft_pipeline_job
from sft_pipeline.resources import MlflowTracking, PipelineStorage

STAGE_MODULES = [curation, augmentation, models, datasets, training, evaluation, registry]


def build_definitions(storage: PipelineStorage | None = None, mlflow_tracking: MlflowTracking | None = None) -> dg.Definitions:
    """The pipeline's Definitions; tests pass their own storage and tracking resources."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules(STAGE_MODULES),
        asset_checks=dg.load_asset_checks_from_modules(STAGE_MODULES),
        jobs=[sft_pipeline_job],
        schedules=[nightly_retraining_schedule],
        resources={"storage": storage or PipelineStorage(), "mlflow_tracking": mlflow_tracking or MlflowTracking()},
    )


defs = build_definitions()
