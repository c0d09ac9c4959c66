"""Automation: retrain when something changed, and only then.

Two triggers launch `sft_pipeline_job` (the full retrain job):

* the nightly schedule `nightly_retraining` (cron and time zone configurable through the
  environment: `SFT_PIPELINE_RETRAIN_CRON`, default ``0 2 * * *``; `SFT_PIPELINE_RETRAIN_TIMEZONE`,
  default ``UTC``);
* the sensor `raw_data_sensor`, when files in the raw-data folder (resource `raw_data`, env
  `SFT_PIPELINE_RAW_DIR`, default ``<project>/data/raw``) are added or changed.

Both ask `retrain_decision`, which uses Dagster's own data and code versions:

1. the **raw-data fingerprint** (sha256 over the names and bytes of the folder's files): if the
   folder holds files and no *successful* run has been tagged with this fingerprint, the whole
   graph runs with `raw_instructions` reading those files;
2. otherwise the **stale status** of every asset (Dagster's `CachingStaleStatusResolver`: an
   asset is stale when its code version changed or a parent has a new data version since it was
   materialized, missing when never materialized): the run is limited to the stale and missing
   assets and everything downstream of them;
3. otherwise the tick is **skipped** with a `SkipReason` that says why, so a nightly tick on
   unchanged data and code spends no GPU time.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

import dagster as dg

from sft_pipeline.resources import RawDataFolder

FINGERPRINT_TAG = "sft_pipeline/raw_data_fingerprint"
TRIGGER_TAG = "sft_pipeline/trigger"
RETRAIN_JOB_NAME = "sft_pipeline_job"


def retrain_cron() -> str:
    return os.environ.get("SFT_PIPELINE_RETRAIN_CRON", "0 2 * * *")


def retrain_timezone() -> str:
    return os.environ.get("SFT_PIPELINE_RETRAIN_TIMEZONE", "UTC")


# ------------------------------------------------------------------------------------------
# What changed


def raw_folder_state(raw: RawDataFolder) -> dict[str, list[int]]:
    """Cheap state of the raw folder: relative name -> [size, mtime_ns] (the sensor's cursor)."""
    from pathlib import Path

    root = Path(raw.path)
    return {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in raw.files()}


def raw_folder_fingerprint(raw: RawDataFolder) -> str | None:
    """sha256 over the relative names and bytes of the raw files; None when the folder has none."""
    from pathlib import Path

    from sft_pipeline.registry import file_sha256

    files = raw.files()
    if not files:
        return None
    root = Path(raw.path)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def raw_sources_run_config(raw: RawDataFolder) -> dict:
    """Run config for `raw_instructions` that ingests the raw folder's files (and the seed set if asked)."""
    sources = [{"path": str(p), "shape": "auto"} for p in raw.files()]
    if raw.include_seed_data:
        from sft_pipeline.ingest import default_sources

        sources = [{"path": str(s.path), "shape": s.shape, "name": s.name} for s in default_sources()] + sources
    return {"ops": {"raw_instructions": {"config": {"sources": sources}}}}


def stale_assets(instance: dg.DagsterInstance, asset_graph, keys=None) -> dict[dg.AssetKey, list[str]]:
    """Assets whose latest materialization is missing or stale (Dagster data/code versions), with causes."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.temporal_context import TemporalContext
    from dagster._time import get_current_datetime

    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)
    keys = keys if keys is not None else asset_graph.materializable_asset_keys
    out: dict[dg.AssetKey, list[str]] = {}
    for key in keys:
        status = resolver.get_status(key)
        if status == StaleStatus.MISSING:
            out[key] = ["never materialized"]
        elif status == StaleStatus.STALE:
            causes = resolver.get_stale_root_causes(key)
            out[key] = [f"{c.asset_key.to_user_string()}: {c.reason}" for c in causes] or ["stale"]
    return out


def last_successful_run_with(instance: dg.DagsterInstance, fingerprint: str):
    """The latest successful run tagged with this raw-data fingerprint, or None."""
    records = instance.get_runs(
        filters=dg.RunsFilter(tags={FINGERPRINT_TAG: fingerprint}, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    return records[0] if records else None


MAX_RAW_DATA_ATTEMPTS = 3
_UNFINISHED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED]


def retry_failed_raw_data_run(instance: dg.DagsterInstance, raw: RawDataFolder) -> dg.RunRequest | dg.SkipReason | None:
    """A new request when the run for the current raw files failed; None when there is nothing to retry."""
    fingerprint = raw_folder_fingerprint(raw)
    if fingerprint is None or last_successful_run_with(instance, fingerprint) is not None:
        return None
    tagged = dg.RunsFilter(tags={FINGERPRINT_TAG: fingerprint})
    if instance.get_runs(filters=dg.RunsFilter(tags=tagged.tags, statuses=_UNFINISHED), limit=1):
        return None  # still running
    failed = len(instance.get_runs(filters=dg.RunsFilter(tags=tagged.tags, statuses=[dg.DagsterRunStatus.FAILURE])))
    if failed == 0:
        return None  # never launched here (e.g. the schedule owns it): nothing to retry
    if failed >= MAX_RAW_DATA_ATTEMPTS:
        return dg.SkipReason(
            f"retraining on the raw data in {raw.path} failed {failed} times; fix the cause and touch the files to try again"
        )
    decision = RetrainDecision(True, f"retry {failed + 1} of {MAX_RAW_DATA_ATTEMPTS} for raw data {fingerprint[:12]}", None, {}, fingerprint)
    return decision.run_request(raw, trigger="raw_data_sensor", run_key=f"{fingerprint}:retry-{failed}")


@dataclass
class RetrainDecision:
    """Whether to retrain, what to materialize, and why."""

    run: bool
    reason: str
    asset_selection: list[dg.AssetKey] | None = None  # None: the whole job
    stale: dict[str, list[str]] = field(default_factory=dict)
    raw_fingerprint: str | None = None

    def run_request(self, raw: RawDataFolder, trigger: str, run_key: str | None = None) -> dg.RunRequest:
        selection = None if self.asset_selection is None else {k.to_user_string() for k in self.asset_selection}
        run_config = raw_sources_run_config(raw) if self.raw_fingerprint and (selection is None or "raw_instructions" in selection) else {}
        tags = {TRIGGER_TAG: trigger, "sft_pipeline/retrain_reason": self.reason[:1000]}
        if self.raw_fingerprint:
            tags[FINGERPRINT_TAG] = self.raw_fingerprint
        return dg.RunRequest(
            run_key=run_key,
            job_name=RETRAIN_JOB_NAME,
            run_config=run_config,
            tags=tags,
            asset_selection=self.asset_selection,
        )


def retrain_decision(instance: dg.DagsterInstance, asset_graph, raw: RawDataFolder) -> RetrainDecision:
    """Retrain on new raw data, or on stale/missing assets (data or code versions changed); else skip."""
    fingerprint = raw_folder_fingerprint(raw)
    if fingerprint is not None and last_successful_run_with(instance, fingerprint) is None:
        return RetrainDecision(True, f"new raw data in {raw.path} (fingerprint {fingerprint[:12]})", None, {}, fingerprint)
    stale = stale_assets(instance, asset_graph)
    if stale:
        selection = set(stale)
        for key in list(stale):
            selection |= _descendants(asset_graph, key)
        # A multi-asset (clean + rejected instructions) cannot be split: select all of its keys.
        for key in list(selection):
            selection |= {k for k in asset_graph.get_execution_set_asset_and_check_keys(key) if isinstance(k, dg.AssetKey)}
        names = sorted(k.to_user_string() for k in stale)
        causes = {k.to_user_string(): v for k, v in stale.items()}
        first = next(iter(sorted(causes.items())))
        return RetrainDecision(
            True, f"stale or missing: {', '.join(names)} (e.g. {first[0]}: {'; '.join(first[1])[:300]})",
            sorted(selection, key=lambda k: k.to_user_string()), causes, fingerprint,
        )
    where = f"; raw data fingerprint {fingerprint[:12]} already trained on" if fingerprint else ""
    return RetrainDecision(False, f"nothing changed: every asset's data and code versions match its last materialization{where}",
                           [], {}, fingerprint)


def _descendants(asset_graph, key: dg.AssetKey) -> set[dg.AssetKey]:
    out, todo = set(), [key]
    while todo:
        for child in asset_graph.get(todo.pop()).child_keys:
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


# ------------------------------------------------------------------------------------------
# Schedule and sensor


@dg.schedule(
    name="nightly_retraining",
    job_name=RETRAIN_JOB_NAME,
    cron_schedule=retrain_cron(),
    execution_timezone=retrain_timezone(),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly retraining (default 02:00 UTC; env SFT_PIPELINE_RETRAIN_CRON / SFT_PIPELINE_RETRAIN_TIMEZONE). "
    "Runs only what changed (new raw files, new data versions, new code versions); skips when nothing did.",
)
def nightly_retraining(context: dg.ScheduleEvaluationContext, raw_data: RawDataFolder):
    decision = retrain_decision(context.instance, context.repository_def.asset_graph, raw_data)
    if not decision.run:
        return dg.SkipReason(decision.reason)
    context.log.info("retraining: %s", decision.reason)
    try:
        scheduled = context.scheduled_execution_time.isoformat()
    except Exception:  # a context built by hand, without a tick time
        scheduled = None
    return decision.run_request(raw_data, trigger="nightly_retraining", run_key=scheduled)


@dg.sensor(
    name="raw_data_sensor",
    job_name=RETRAIN_JOB_NAME,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Starts retraining when files are added to or changed in the raw-data folder (resource raw_data, "
    "env SFT_PIPELINE_RAW_DIR). Cursor: the folder's file names, sizes and modification times.",
)
def raw_data_sensor(context: dg.SensorEvaluationContext, raw_data: RawDataFolder):
    state = raw_folder_state(raw_data)
    previous = json.loads(context.cursor) if context.cursor else {}
    new_or_changed = sorted(name for name, stat in state.items() if previous.get(name) != stat)
    if not new_or_changed:
        # The cursor already moved past these files: a run for them that failed is retried here,
        # under a new run key (Dagster never relaunches a run key), at most MAX_RAW_DATA_ATTEMPTS times.
        retry = retry_failed_raw_data_run(context.instance, raw_data) if state else None
        return retry or dg.SkipReason(f"no new or changed files in {raw_data.path}")
    context.update_cursor(json.dumps(state, sort_keys=True))
    decision = retrain_decision(context.instance, context.repository_def.asset_graph, raw_data)
    if not decision.run:
        return dg.SkipReason(f"files touched ({', '.join(new_or_changed[:5])}) but {decision.reason}")
    return decision.run_request(raw_data, trigger="raw_data_sensor", run_key=decision.raw_fingerprint or None)
