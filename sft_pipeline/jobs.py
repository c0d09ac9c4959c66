"""Jobs and schedules over the asset graph."""

from __future__ import annotations

import dagster as dg

# The whole lifecycle, raw data to registered model.
sft_pipeline_job = dg.define_asset_job(
    name="sft_pipeline_job",
    selection=dg.AssetSelection.all(),
    description="Materialize every asset: ingest, curate, augment, tokenize, train, evaluate, register.",
)

nightly_retraining_schedule = dg.ScheduleDefinition(
    name="nightly_retraining",
    job=sft_pipeline_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain every night at 02:00 UTC; turn it on in the UI under Automation.",
)
