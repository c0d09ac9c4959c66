"""Automation: the nightly schedule and the raw-data sensor, which retrain when something changed, and only then.

Two triggers launch `sft_pipeline_job` (the full retrain job):

* the nightly schedule `nightly_retraining` (cron and time zone configurable through the
  environment: `SFT_PIPELINE_RETRAIN_CRON`, default ``0 2 * * *``; `SFT_PIPELINE_RETRAIN_TIMEZONE`,
  default ``UTC``);
* the sensor `raw_data_sensor`, when files in the raw-data folder (resource `raw_data`, env
  `SFT_PIPELINE_RAW_DIR`, default ``<project>/data/raw``) are added or changed.

Both first look for a retrain that is still **in flight** (queued, starting, running or being
canceled): while one is, they start nothing and say which run they wait for. Otherwise both ask
`retrain_decision`, which reads Dagster's own data and code versions through public APIs only
(the latest materialization of each asset and its `dagster/code_version`,
`dagster/data_version` and `dagster/input_data_version/<parent>` tags):

1. the **raw-data fingerprint** (digest of the names and bytes of the folder's files): if the
   folder holds files and no *successful* run has been tagged with this fingerprint, the whole
   graph runs with `raw_instructions` reading those files;
2. otherwise the **stale** assets (code version changed since the last materialization, a parent
   has a new data version, a dependency was added or removed) and the **missing** ones (never
   materialized): the run is limited to them and everything downstream;
3. otherwise the tick is **skipped** with a `SkipReason` that says why, so a nightly tick on
   unchanged data and code spends no GPU time.

A retrain for the same change that failed `MAX_RAW_DATA_ATTEMPTS` times is not launched again
(the sensor retries a failed raw-data run under a new run key up to that bound).

Why a schedule and a sensor rather than `AutomationCondition`s: declarative automation launches
runs without run config, and a raw-data retrain must hand `raw_instructions` the folder's files
as run config; bounded retries of a failed change and the skip reasons shown on each tick are
not expressible as conditions either (docs/registry_and_automation.md, "Why not declarative
automation").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import dagster as dg

from sft_pipeline.defs.resources import RawDataFolder
from sft_pipeline.hashing import files_digest, json_digest

FINGERPRINT_TAG = "sft_pipeline/raw_data_fingerprint"
STALE_DIGEST_TAG = "sft_pipeline/stale_digest"
TRIGGER_TAG = "sft_pipeline/trigger"
RETRAIN_JOB_NAME = "sft_pipeline_job"
MAX_RAW_DATA_ATTEMPTS = 3

# Dagster's materialization tags (documented under "Asset versioning and caching").
CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_TAG = "dagster/data_version"
INPUT_DATA_VERSION_TAG_PREFIX = "dagster/input_data_version/"
# What Dagster assumes for a materialization that recorded no data version.
INITIAL_DATA_VERSION = "INITIAL"

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def retrain_cron() -> str:
    return os.environ.get("SFT_PIPELINE_RETRAIN_CRON", "0 2 * * *")


def retrain_timezone() -> str:
    return os.environ.get("SFT_PIPELINE_RETRAIN_TIMEZONE", "UTC")


# ------------------------------------------------------------------------------------------
# The raw-data folder


def raw_folder_state(raw: RawDataFolder) -> dict[str, list[int]]:
    """Cheap state of the raw folder: relative name -> [size, mtime_ns] (the sensor's cursor)."""
    root = Path(raw.path)
    return {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in raw.files()}


def raw_folder_fingerprint(raw: RawDataFolder) -> str | None:
    """Digest over the relative names and bytes of the raw files; None when the folder has none."""
    files = raw.files()
    return files_digest(files, root=raw.path) if files else None


def raw_sources_run_config(raw: RawDataFolder) -> dict:
    """Run config for `raw_instructions` that ingests the raw folder's files (and the seed set if asked)."""
    sources = [{"path": str(p), "shape": "auto"} for p in raw.files()]
    if raw.include_seed_data:
        from sft_pipeline.ingest import default_sources

        sources = [{"path": str(s.path), "shape": s.shape, "name": s.name} for s in default_sources()] + sources
    return {"ops": {"raw_instructions": {"config": {"sources": sources}}}}


# ------------------------------------------------------------------------------------------
# The asset graph and its versions, through public Dagster APIs


@dataclass(frozen=True)
class LineageGraph:
    """The materializable assets: their parents, current code versions, and the keys that must run together."""

    parents: Mapping[dg.AssetKey, frozenset[dg.AssetKey]]
    code_versions: Mapping[dg.AssetKey, str | None]
    # A multi-asset that cannot be subset (clean + rejected instructions) runs all of its keys or none.
    execution_sets: Mapping[dg.AssetKey, frozenset[dg.AssetKey]]

    @classmethod
    def of(cls, source: "LineageGraph | dg.Definitions | dg.RepositoryDefinition") -> "LineageGraph":
        if isinstance(source, LineageGraph):
            return source
        repo = source.get_repository_def() if isinstance(source, dg.Definitions) else source
        parents, code_versions, execution_sets = {}, {}, {}
        for key, assets_def in repo.assets_defs_by_key.items():
            if not assets_def.is_materializable:
                continue
            parents[key] = frozenset(assets_def.asset_deps.get(key, ()))
            code_versions[key] = assets_def.code_versions_by_key.get(key)
            execution_sets[key] = frozenset({key}) if assets_def.can_subset else frozenset(assets_def.keys)
        return cls(parents, code_versions, execution_sets)

    @property
    def keys(self) -> list[dg.AssetKey]:
        return sorted(self.parents, key=lambda k: k.to_user_string())

    def children(self, key: dg.AssetKey) -> set[dg.AssetKey]:
        return {child for child, parents in self.parents.items() if key in parents}

    def closure(self, keys: Iterable[dg.AssetKey]) -> set[dg.AssetKey]:
        """`keys`, everything downstream of them, and whatever must run with any of those."""
        out, todo = set(), list(keys)
        while todo:
            key = todo.pop()
            if key in out:
                continue
            out.add(key)
            todo.extend(self.children(key))
            todo.extend(self.execution_sets.get(key, ()))
        return out


@dataclass(frozen=True)
class Materialized:
    """What the latest materialization of an asset recorded."""

    data_version: str
    code_version: str | None
    input_data_versions: Mapping[dg.AssetKey, str]
    timestamp: float


def latest_materialization(instance: dg.DagsterInstance, key: dg.AssetKey, observed: bool = False) -> Materialized | None:
    """The latest materialization of `key` (with `observed`: its latest observation, for a source asset)."""
    if observed:
        records = instance.fetch_observations(key, limit=1).records
        entry = records[0].event_log_entry if records else None
        event = entry.asset_observation if entry is not None else None
    else:
        entry = instance.get_latest_materialization_event(key)
        event = entry.asset_materialization if entry is not None else None
    if event is None:
        return None
    tags = event.tags or {}
    inputs = {dg.AssetKey.from_user_string(k[len(INPUT_DATA_VERSION_TAG_PREFIX):]): v
              for k, v in tags.items() if k.startswith(INPUT_DATA_VERSION_TAG_PREFIX)}
    return Materialized(tags.get(DATA_VERSION_TAG) or INITIAL_DATA_VERSION, tags.get(CODE_VERSION_TAG), inputs,
                        entry.timestamp)


def stale_assets(instance: dg.DagsterInstance, graph, keys=None) -> dict[dg.AssetKey, list[str]]:
    """Assets whose latest materialization is missing or stale (Dagster data/code versions), with causes.

    The rules are Dagster's own for unpartitioned assets: stale when the code version changed, when
    a parent's current data version differs from the one recorded as this asset's input, or when a
    dependency was added or removed; a materialization without version tags (older Dagster) is
    stale when a parent was materialized after it.
    """
    graph = LineageGraph.of(graph)
    latest = {key: latest_materialization(instance, key) for key in graph.keys}
    # Parents that are not materialized here (an observable source asset) get their versions from observations.
    for parent in set().union(*graph.parents.values()) - set(latest):
        latest[parent] = latest_materialization(instance, parent, observed=True)
    out: dict[dg.AssetKey, list[str]] = {}
    for key in keys if keys is not None else graph.keys:
        record = latest[key]
        name = key.to_user_string()
        if record is None:
            out[key] = ["never materialized"]
            continue
        causes = []
        if record.code_version is None:
            for parent in sorted(graph.parents[key], key=lambda k: k.to_user_string()):
                parent_record = latest.get(parent)
                if parent_record is not None and parent_record.timestamp > record.timestamp:
                    causes.append(f"{parent.to_user_string()}: has a new materialization")
            if causes:
                out[key] = causes
            continue
        current_code = graph.code_versions.get(key)
        if current_code and current_code != record.code_version:
            causes.append(f"{name}: has a new code version ({record.code_version} -> {current_code})")
        for dep in sorted(set(record.input_data_versions) - graph.parents[key], key=lambda k: k.to_user_string()):
            causes.append(f"{name}: removed dependency on {dep.to_user_string()}")
        for parent in sorted(graph.parents[key], key=lambda k: k.to_user_string()):
            if parent not in record.input_data_versions:
                causes.append(f"{name}: has a new dependency on {parent.to_user_string()}")
                continue
            recorded = record.input_data_versions[parent]
            parent_record = latest.get(parent)
            if parent_record is None:
                # Dagster treats INITIAL (assumed to exist) against never-materialized as unchanged.
                if recorded != INITIAL_DATA_VERSION:
                    causes.append(f"{parent.to_user_string()}: was recorded as an input but has no materialization")
            elif parent_record.data_version != recorded:
                causes.append(f"{parent.to_user_string()}: has a new data version "
                              f"({recorded[:12]} -> {parent_record.data_version[:12]})")
        if causes:
            out[key] = causes
    return out


# ------------------------------------------------------------------------------------------
# Runs: successful, failed, in flight


def last_successful_run_with(instance: dg.DagsterInstance, fingerprint: str):
    """The latest successful run tagged with this raw-data fingerprint, or None."""
    records = instance.get_runs(
        filters=dg.RunsFilter(tags={FINGERPRINT_TAG: fingerprint}, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    return records[0] if records else None


def retrain_in_flight(instance: dg.DagsterInstance, asset_keys: Iterable[dg.AssetKey] | None = None) -> dg.DagsterRun | None:
    """A run that is queued or running and would retrain the same assets, or None.

    Any unfinished run of the retrain job counts; with `asset_keys`, so does a run of another job
    (a "Materialize" click, `data_job`, `eval_job`) whose asset selection overlaps them.
    """
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=RETRAIN_JOB_NAME, statuses=IN_FLIGHT), limit=1)
    if runs:
        return runs[0]
    wanted = set(asset_keys or ())
    if wanted:
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT)):
            if run.asset_selection and wanted & set(run.asset_selection):
                return run
    return None


def in_flight_reason(run: dg.DagsterRun) -> str:
    return (f"retrain run {run.run_id} (job {run.job_name}, {run.status.value}) is still in flight; "
            "not starting another for the same assets until it finishes")


def failed_attempts(instance: dg.DagsterInstance, tags: Mapping[str, str]) -> int:
    return len(instance.get_runs(filters=dg.RunsFilter(tags=dict(tags), statuses=[dg.DagsterRunStatus.FAILURE])))


def retry_failed_raw_data_run(instance: dg.DagsterInstance, raw: RawDataFolder) -> dg.RunRequest | dg.SkipReason | None:
    """A new request when the run for the current raw files failed; None when there is nothing to retry."""
    fingerprint = raw_folder_fingerprint(raw)
    if fingerprint is None or last_successful_run_with(instance, fingerprint) is not None:
        return None
    if instance.get_runs(filters=dg.RunsFilter(tags={FINGERPRINT_TAG: fingerprint}, statuses=IN_FLIGHT), limit=1):
        return None  # still running
    failed = failed_attempts(instance, {FINGERPRINT_TAG: fingerprint})
    if failed == 0:
        return None  # never launched here (e.g. the schedule owns it): nothing to retry
    if failed >= MAX_RAW_DATA_ATTEMPTS:
        return dg.SkipReason(
            f"retraining on the raw data in {raw.path} failed {failed} times; fix the cause and touch the files to try again"
        )
    decision = RetrainDecision(True, f"retry {failed + 1} of {MAX_RAW_DATA_ATTEMPTS} for raw data {fingerprint[:12]}", None, {}, fingerprint)
    return decision.run_request(raw, trigger="raw_data_sensor", run_key=f"{fingerprint}:retry-{failed}")


# ------------------------------------------------------------------------------------------
# The decision


@dataclass
class RetrainDecision:
    """Whether to retrain, what to materialize, and why."""

    run: bool
    reason: str
    asset_selection: list[dg.AssetKey] | None = None  # None: the whole job
    stale: dict[str, list[str]] = field(default_factory=dict)
    raw_fingerprint: str | None = None
    stale_digest: str | None = None  # identity of the stale state this run brings up to date

    def identity_tags(self) -> dict[str, str]:
        """The tags that name the change this retrain is for (how its failed attempts are counted)."""
        if self.raw_fingerprint and self.asset_selection is None:
            return {FINGERPRINT_TAG: self.raw_fingerprint}
        return {STALE_DIGEST_TAG: self.stale_digest} if self.stale_digest else {}

    def selected_keys(self, graph) -> set[dg.AssetKey]:
        return set(LineageGraph.of(graph).keys) if self.asset_selection is None else set(self.asset_selection)

    def run_request(self, raw: RawDataFolder, trigger: str, run_key: str | None = None) -> dg.RunRequest:
        selection = None if self.asset_selection is None else {k.to_user_string() for k in self.asset_selection}
        run_config = raw_sources_run_config(raw) if self.raw_fingerprint and (selection is None or "raw_instructions" in selection) else {}
        tags = {TRIGGER_TAG: trigger, "sft_pipeline/retrain_reason": self.reason[:1000]}
        if self.raw_fingerprint:
            tags[FINGERPRINT_TAG] = self.raw_fingerprint
        if self.stale_digest:
            tags[STALE_DIGEST_TAG] = self.stale_digest
        return dg.RunRequest(
            run_key=run_key,
            job_name=RETRAIN_JOB_NAME,
            run_config=run_config,
            tags=tags,
            asset_selection=self.asset_selection,
        )


def retrain_decision(instance: dg.DagsterInstance, graph, raw: RawDataFolder) -> RetrainDecision:
    """Retrain on new raw data, or on stale/missing assets (data or code versions changed); else skip.

    `graph`: the Definitions, the RepositoryDefinition (a tick's `context.repository_def`) or a LineageGraph.
    """
    graph = LineageGraph.of(graph)
    fingerprint = raw_folder_fingerprint(raw)
    if fingerprint is not None and last_successful_run_with(instance, fingerprint) is None:
        return RetrainDecision(True, f"new raw data in {raw.path} (fingerprint {fingerprint[:12]})", None, {}, fingerprint)
    stale = stale_assets(instance, graph)
    if stale:
        selection = graph.closure(stale)
        names = sorted(k.to_user_string() for k in stale)
        causes = {k.to_user_string(): v for k, v in stale.items()}
        first = next(iter(sorted(causes.items())))
        return RetrainDecision(
            True, f"stale or missing: {', '.join(names)} (e.g. {first[0]}: {'; '.join(first[1])[:300]})",
            sorted(selection, key=lambda k: k.to_user_string()), causes, fingerprint, json_digest(causes),
        )
    where = f"; raw data fingerprint {fingerprint[:12]} already trained on" if fingerprint else ""
    return RetrainDecision(False, f"nothing changed: every asset's data and code versions match its last materialization{where}",
                           [], {}, fingerprint)


def gave_up_reason(instance: dg.DagsterInstance, decision: RetrainDecision) -> str | None:
    """Why not to launch this change again: it already failed MAX_RAW_DATA_ATTEMPTS times."""
    tags = decision.identity_tags()
    failed = failed_attempts(instance, tags) if tags else 0
    if failed < MAX_RAW_DATA_ATTEMPTS:
        return None
    return (f"retraining for this change failed {failed} times ({decision.reason[:300]}); fix the cause, then "
            f"change the data or code or launch {RETRAIN_JOB_NAME} by hand")


# ------------------------------------------------------------------------------------------
# Schedule and sensor


@dg.schedule(
    name="nightly_retraining",
    job_name=RETRAIN_JOB_NAME,
    cron_schedule=retrain_cron(),
    execution_timezone=retrain_timezone(),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly retraining (default 02:00 UTC; env SFT_PIPELINE_RETRAIN_CRON / SFT_PIPELINE_RETRAIN_TIMEZONE). "
    "Runs only what changed (new raw files, new data versions, new code versions); skips when nothing did "
    "and while a retrain is still queued or running.",
)
def nightly_retraining(context: dg.ScheduleEvaluationContext, raw_data: RawDataFolder):
    running = retrain_in_flight(context.instance)
    if running is not None:
        return dg.SkipReason(in_flight_reason(running))
    graph = LineageGraph.of(context.repository_def)
    decision = retrain_decision(context.instance, graph, raw_data)
    if not decision.run:
        return dg.SkipReason(decision.reason)
    running = retrain_in_flight(context.instance, decision.selected_keys(graph))
    if running is not None:
        return dg.SkipReason(in_flight_reason(running))
    gave_up = gave_up_reason(context.instance, decision)
    if gave_up:
        return dg.SkipReason(gave_up)
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
    "env SFT_PIPELINE_RAW_DIR), never while a retrain is still queued or running. Cursor: the folder's file "
    "names, sizes and modification times.",
)
def raw_data_sensor(context: dg.SensorEvaluationContext, raw_data: RawDataFolder):
    # While a retrain is in flight the cursor stays where it is, so files that landed meanwhile
    # are still new on the first tick after it finishes.
    running = retrain_in_flight(context.instance)
    if running is not None:
        return dg.SkipReason(in_flight_reason(running))
    state = raw_folder_state(raw_data)
    previous = json.loads(context.cursor) if context.cursor else {}
    new_or_changed = sorted(name for name, stat in state.items() if previous.get(name) != stat)
    if not new_or_changed:
        # The cursor already moved past these files: a run for them that failed is retried here,
        # under a new run key (Dagster never relaunches a run key), at most MAX_RAW_DATA_ATTEMPTS times.
        retry = retry_failed_raw_data_run(context.instance, raw_data) if state else None
        return retry or dg.SkipReason(f"no new or changed files in {raw_data.path}")
    graph = LineageGraph.of(context.repository_def)
    decision = retrain_decision(context.instance, graph, raw_data)
    if decision.run:
        running = retrain_in_flight(context.instance, decision.selected_keys(graph))
        if running is not None:
            return dg.SkipReason(in_flight_reason(running))
    context.update_cursor(json.dumps(state, sort_keys=True))
    if not decision.run:
        return dg.SkipReason(f"files touched ({', '.join(new_or_changed[:5])}) but {decision.reason}")
    run_key = decision.raw_fingerprint or None
    if run_key and decision.asset_selection is None:
        # Files touched after failed attempts: a fresh try, under a run key Dagster has not seen.
        failed = failed_attempts(context.instance, {FINGERPRINT_TAG: run_key})
        run_key = f"{run_key}:retry-{failed}" if failed else run_key
    return decision.run_request(raw_data, trigger="raw_data_sensor", run_key=run_key)
