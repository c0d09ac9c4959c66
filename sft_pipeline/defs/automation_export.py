"""Automation of the export: `champion_export_sensor` re-materializes `champion_export` when the alias moves.

Why a sensor and not an `AutomationCondition`: the alias lives in MLflow, outside Dagster. A condition only
sees Dagster's own events, so `eager()` on `champion_export` would fire on every `registered_model`
materialization (most of which leave the champion where it was) and never on a move made in MLflow itself
(`registry.set_alias` for a rollback, the MLflow UI), which writes no Dagster event at all. Observing the
alias through an observable source asset would need a scheduled observation plus a condition, two moving
parts for what one sensor does: read the alias, compare it with what `champion_export` last exported
(its materialization's `champion_version` and `model_sha256` metadata), and ask for a run when they differ.

Each tick:

1. no version holds the alias: skip, saying so;
2. the latest `champion_export` already holds this version (same version and model digest): skip;
3. `registered_model` was never materialized (the export's declared input): skip, saying so;
4. a run that will materialize `champion_export` is queued or running (a retrain job, a click, an earlier
   request of this sensor): skip, naming it; the next tick looks again;
5. otherwise request a run of `champion_export` alone. Its run key is the version, its digest and the export it
   replaces, so a rollback to a version exported before starts a run too, and one move starts one run.
"""

import dagster as dg

from sft_pipeline.defs.automation import IN_FLIGHT, RETRAIN_JOB_NAME
from sft_pipeline.defs.resources import MlflowTracking
from sft_pipeline.export import CHAMPION_ALIAS, find_champion

EXPORT_ASSET = dg.AssetKey("champion_export")
REGISTERED_ASSET = dg.AssetKey("registered_model")
CHAMPION_VERSION_TAG = "sft_pipeline/champion_version"


def last_export(instance: dg.DagsterInstance) -> tuple[int | None, str, str]:
    """(champion version, model digest, run id) of the latest `champion_export` materialization."""
    entry = instance.get_latest_materialization_event(EXPORT_ASSET)
    if entry is None or entry.asset_materialization is None:
        return None, "", ""
    metadata = entry.asset_materialization.metadata or {}

    def value(name: str):
        item = metadata.get(name)
        return getattr(item, "value", item)

    version = value("champion_version")
    return (int(version) if version is not None and int(version) >= 0 else None), str(value("model_sha256") or ""), entry.run_id


def export_in_flight(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    """A queued or running run that will materialize `champion_export`: a run of the retrain job (every asset),
    or any run whose asset selection holds it."""
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT)):
        if run.asset_selection is not None:
            if EXPORT_ASSET in run.asset_selection:
                return run
        elif run.job_name == RETRAIN_JOB_NAME:
            return run
    return None


@dg.sensor(
    name="champion_export_sensor",
    target=dg.AssetSelection.assets(EXPORT_ASSET),
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Re-materializes champion_export when the MLflow alias `champion` points to another version than "
    "the one last exported (a promotion, or a move by hand such as a rollback). Cursor: the alias's version:digest.",
)
def champion_export_sensor(context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking):
    champion = find_champion(mlflow_tracking.tracking_uri, mlflow_tracking.registered_model_name, CHAMPION_ALIAS)
    if champion is None:
        return dg.SkipReason(f"no version of {mlflow_tracking.registered_model_name} is aliased {CHAMPION_ALIAS}")
    current = f"{champion.version}:{champion.model_sha256}"
    context.update_cursor(current)
    exported_version, exported_sha, exported_by = last_export(context.instance)
    if (exported_version, exported_sha) == (champion.version, champion.model_sha256):
        return dg.SkipReason(f"version {champion.version} ({CHAMPION_ALIAS}) is already exported (run {exported_by})")
    if context.instance.get_latest_materialization_event(REGISTERED_ASSET) is None:
        return dg.SkipReason("registered_model was never materialized in this Dagster instance: run the pipeline first")
    running = export_in_flight(context.instance)
    if running is not None:
        return dg.SkipReason(f"run {running.run_id} ({running.job_name}, {running.status.value}) will materialize "
                             f"champion_export; waiting for it before exporting version {champion.version}")
    previous = f"v{exported_version}" if exported_version is not None else "none"
    return dg.RunRequest(
        run_key=f"champion-v{champion.version}-{champion.model_sha256[:12]}-after-{previous}-{exported_by[:8] or 'none'}",
        asset_selection=[EXPORT_ASSET],
        tags={CHAMPION_VERSION_TAG: str(champion.version)},
    )
