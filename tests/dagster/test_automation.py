"""Jobs, the nightly schedule and the raw-data sensor: retrain only when data or code versions changed,
never while a retrain is in flight, and retry a failed one a bounded number of times.

The real schedule and sensor are evaluated against the real asset graph on a temporary instance.
Materializations come from fast stand-ins: assets with the same keys, parents and code versions
as the real ones, so Dagster's staleness bookkeeping is exactly what a real run leaves behind,
without training anything.
"""

import datetime
import json
import os
import re
from pathlib import Path

import dagster as dg
import pytest

from sft_pipeline.definitions import build_definitions
from sft_pipeline.defs.automation import (
    FINGERPRINT_TAG,
    MAX_RAW_DATA_ATTEMPTS,
    LineageGraph,
    raw_data_sensor,
    raw_folder_fingerprint,
    raw_sources_run_config,
    retrain_cron,
    retrain_decision,
    retrain_timezone,
)
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage, RawDataFolder


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    return RawDataFolder(path=str(folder))


@pytest.fixture
def defs(tmp_path, raw):
    return build_definitions(
        PipelineStorage(root=str(tmp_path / "artifacts")),
        MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        raw,
    )


def stand_ins(graph: LineageGraph, data_versions: dict[str, str] | None = None) -> list[dg.AssetsDefinition]:
    """One trivial asset per real asset: same key, parents and code version; optional fixed data versions."""
    data_versions = data_versions or {}
    out = []
    for key in graph.keys:
        name = key.to_user_string()
        out.append(dg.asset(name=name, deps=sorted(graph.parents[key], key=lambda k: k.to_user_string()),
                            code_version=graph.code_versions[key])(_compute(data_versions.get(name))))
    return out


def _compute(version: str | None):
    def compute():
        return dg.MaterializeResult(data_version=dg.DataVersion(version) if version else None)

    return compute


def materialize(graph, instance, select=None, data_versions=None, tags=None):
    assets = stand_ins(graph, data_versions)
    chosen = [a for a in assets if select is None or a.key.to_user_string() in select]
    result = dg.materialize(chosen, instance=instance, tags=tags, selection=chosen)
    assert result.success


def names(keys) -> set[str]:
    return {k.to_user_string() for k in keys}


def test_jobs_select_the_right_stages(defs):
    def ops(job_name):
        return set(defs.resolve_job_def(job_name).graph.node_dict)

    full = ops("sft_pipeline_job")
    assert {"raw_instructions", "fine_tuned_model", "model_evaluation", "registered_model"} <= full
    data = ops("data_job")
    assert {"raw_instructions", "curated_instructions", "synthetic_instructions", "sft_dataset"} <= data
    assert not data & {"fine_tuned_model", "base_model_evaluation", "model_evaluation", "registered_model"}
    assert ops("eval_job") == {"mmlu_benchmark", "base_model_evaluation", "model_evaluation"}
    schedule = defs.resolve_schedule_def("nightly_retraining")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert defs.resolve_sensor_def("raw_data_sensor").job_name == "sft_pipeline_job"


def test_cron_and_time_zone_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("SFT_PIPELINE_RETRAIN_CRON", raising=False)
    monkeypatch.delenv("SFT_PIPELINE_RETRAIN_TIMEZONE", raising=False)
    assert (retrain_cron(), retrain_timezone()) == ("0 2 * * *", "UTC")
    monkeypatch.setenv("SFT_PIPELINE_RETRAIN_CRON", "* * * * *")  # what the browser test uses
    monkeypatch.setenv("SFT_PIPELINE_RETRAIN_TIMEZONE", "Europe/Paris")
    assert (retrain_cron(), retrain_timezone()) == ("* * * * *", "Europe/Paris")


def test_no_private_dagster_api_in_the_package():
    root = Path(__file__).resolve().parents[2] / "sft_pipeline"
    private = re.compile(r"^\s*(from|import)\s+dagster\._", re.MULTILINE)
    offenders = [str(p) for p in root.rglob("*.py") if private.search(p.read_text())]
    assert not offenders, offenders


def test_decision_follows_data_and_code_versions(defs, raw):
    graph = LineageGraph.of(defs)
    instance = dg.DagsterInstance.ephemeral()

    first = retrain_decision(instance, graph, raw)
    assert first.run and names(first.asset_selection) == names(graph.keys)
    assert first.stale["fine_tuned_model"] == ["never materialized"]

    materialize(graph, instance)
    unchanged = retrain_decision(instance, graph, raw)
    assert not unchanged.run and unchanged.asset_selection == [] and "nothing changed" in unchanged.reason

    # The data stage ran again and produced the same content: still nothing to train.
    materialize(graph, instance, select={"sft_dataset"})
    assert not retrain_decision(instance, graph, raw).run

    # New data version of sft_dataset: exactly the training and downstream stages are stale.
    materialize(graph, instance, select={"sft_dataset"}, data_versions={"sft_dataset": "new-content"})
    changed = retrain_decision(instance, graph, raw)
    assert changed.run
    assert names(changed.asset_selection) == {"fine_tuned_model", "model_evaluation", "registered_model", "champion_export"}
    assert any("sft_dataset" in cause for cause in changed.stale["fine_tuned_model"])


def test_decision_sees_code_version_changes(defs, raw):
    graph = LineageGraph.of(defs)
    instance = dg.DagsterInstance.ephemeral()
    materialize(graph, instance)
    # Record registered_model as materialized by an older code version: the current code is newer.
    older = dg.asset(name="registered_model", deps=sorted(graph.parents[dg.AssetKey("registered_model")]),
                     code_version="0")(lambda: None)
    assert dg.materialize([older], instance=instance).success
    decision = retrain_decision(instance, graph, raw)
    assert decision.run and names(decision.asset_selection) == {"registered_model", "champion_export"}
    assert "code version" in " ".join(decision.stale["registered_model"])


def test_new_raw_files_retrain_once(defs, raw):
    graph = LineageGraph.of(defs)
    instance = dg.DagsterInstance.ephemeral()
    materialize(graph, instance)
    assert not retrain_decision(instance, graph, raw).run

    (Path(raw.path) / "tickets.jsonl").write_text(
        json.dumps({"instruction": "Reset my password", "output": "Use the link."}) + "\n"
    )
    fingerprint = raw_folder_fingerprint(raw)
    decision = retrain_decision(instance, graph, raw)
    assert decision.run and decision.asset_selection is None and decision.raw_fingerprint == fingerprint
    request = decision.run_request(raw, trigger="test")
    sources = request.run_config["ops"]["raw_instructions"]["config"]["sources"]
    assert [s["path"] for s in sources] == [str(raw.files()[0])]
    assert request.tags[FINGERPRINT_TAG] == fingerprint

    # A successful run tagged with this fingerprint: the same files are not trained on again.
    materialize(graph, instance, tags={FINGERPRINT_TAG: fingerprint})
    assert not retrain_decision(instance, graph, raw).run
    assert raw_sources_run_config(RawDataFolder(path=raw.path, include_seed_data=True))["ops"]["raw_instructions"]["config"]["sources"][0]["path"] != sources[0]["path"]


@pytest.fixture
def persistent_instance():
    """An instance with a ref on disk: a schedule context that gets resources rebuilds it from the ref."""
    with dg.instance_for_test() as instance:
        yield instance


def test_schedule_runs_only_when_something_changed(defs, raw, persistent_instance):
    graph = LineageGraph.of(defs)
    instance = persistent_instance
    schedule = defs.resolve_schedule_def("nightly_retraining")
    repo = defs.get_repository_def()

    def evaluate():
        tick_time = datetime.datetime(2030, 1, 1, 2, 0, tzinfo=datetime.timezone.utc)
        with dg.build_schedule_context(instance=instance, repository_def=repo, resources={"raw_data": raw},
                                       scheduled_execution_time=tick_time) as context:
            return schedule.evaluate_tick(context)

    first = evaluate()
    assert len(first.run_requests) == 1 and first.run_requests[0].job_name == "sft_pipeline_job"
    assert first.run_requests[0].run_key == "2030-01-01T02:00:00+00:00"

    materialize(graph, instance)
    skipped = evaluate()
    assert not skipped.run_requests and "nothing changed" in skipped.skip_message

    materialize(graph, instance, select={"base_model"}, data_versions={"base_model": "new-revision"})
    rerun = evaluate()
    assert len(rerun.run_requests) == 1
    selected = names(rerun.run_requests[0].asset_selection)
    assert "fine_tuned_model" in selected and "base_model_evaluation" in selected and "raw_instructions" not in selected
    assert rerun.run_requests[0].run_config == {}  # raw_instructions is not part of this run


def test_sensor_fires_on_new_files_and_keeps_a_cursor(defs, raw):
    graph = LineageGraph.of(defs)
    instance = dg.DagsterInstance.ephemeral()
    materialize(graph, instance)
    repo = defs.get_repository_def()

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, repository_def=repo, cursor=cursor, resources={"raw_data": raw})
        result = raw_data_sensor.evaluate_tick(context)
        return result, context.cursor

    result, cursor = tick(None)
    assert not result.run_requests and "no new or changed files" in result.skip_message

    path = os.path.join(raw.path, "batch1.jsonl")
    with open(path, "w") as fh:
        fh.write(json.dumps({"instruction": "Say hi", "output": "Hi"}) + "\n")
    result, cursor = tick(cursor)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.run_key == raw_folder_fingerprint(raw)
    assert request.run_config["ops"]["raw_instructions"]["config"]["sources"][0]["path"] == path
    assert json.loads(cursor) == {"batch1.jsonl": [os.path.getsize(path), os.stat(path).st_mtime_ns]}

    result, cursor = tick(cursor)  # nothing new since
    assert not result.run_requests


def test_sensor_retries_a_failed_raw_data_run_a_bounded_number_of_times(defs, raw):
    instance = dg.DagsterInstance.ephemeral()
    repo = defs.get_repository_def()
    path = os.path.join(raw.path, "batch1.jsonl")
    with open(path, "w") as fh:
        fh.write(json.dumps({"instruction": "Say hi", "output": "Hi"}) + "\n")

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, repository_def=repo, cursor=cursor, resources={"raw_data": raw})
        return raw_data_sensor.evaluate_tick(context), context.cursor

    first, cursor = tick(None)
    assert first.run_requests[0].run_key == raw_folder_fingerprint(raw)
    fingerprint = raw_folder_fingerprint(raw)

    def record_failed_run():
        run = instance.create_run_for_job(
            dg.GraphDefinition(name="stand_in", node_defs=[]).to_job(), tags={FINGERPRINT_TAG: fingerprint}
        )
        instance.report_run_failed(run)

    record_failed_run()
    retry, cursor = tick(cursor)  # files unchanged, but their run failed
    assert [r.run_key for r in retry.run_requests] == [f"{fingerprint}:retry-1"]
    for _ in range(MAX_RAW_DATA_ATTEMPTS - 1):
        record_failed_run()
    gave_up, _ = tick(cursor)
    assert not gave_up.run_requests and f"failed {MAX_RAW_DATA_ATTEMPTS} times" in gave_up.skip_message


# ------------------------------------------------------------------------------------------
# Never two retrains for the same assets at once


def fake_run(instance, status, job_name="sft_pipeline_job", tags=None, asset_selection=None) -> dg.DagsterRun:
    """A run record in `status`, as the daemon leaves it while a retrain is queued or running."""
    # (QUEUED needs a code location's origin, which a test instance has not: NOT_STARTED and
    # STARTING stand for a retrain that waits to start.)
    if asset_selection:
        assets = [dg.asset(key=key)(lambda: None) for key in asset_selection]
        job = dg.Definitions(assets=assets, jobs=[dg.define_asset_job(job_name)]).resolve_job_def(job_name)
    else:
        job = dg.GraphDefinition(name=job_name, node_defs=[]).to_job()
    return instance.create_run_for_job(job, status=status, tags=tags or {}, asset_selection=asset_selection)


def schedule_tick(defs, instance, raw, minute: int):
    tick_time = datetime.datetime(2030, 1, 1, 2, minute, tzinfo=datetime.timezone.utc)
    with dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                   resources={"raw_data": raw}, scheduled_execution_time=tick_time) as context:
        return defs.resolve_schedule_def("nightly_retraining").evaluate_tick(context)


def add_raw_file(raw, name="batch1.jsonl") -> str:
    path = os.path.join(raw.path, name)
    with open(path, "w") as fh:
        fh.write(json.dumps({"instruction": "Say hi", "output": "Hi"}) + "\n")
    return path


def test_schedule_starts_nothing_while_a_retrain_outlasts_two_ticks(defs, raw, persistent_instance):
    """Every-minute cron, a retrain that takes longer: exactly one run, then one more only after it ends."""
    instance = persistent_instance
    graph = LineageGraph.of(defs)
    materialize(graph, instance)
    add_raw_file(raw)

    first = schedule_tick(defs, instance, raw, 0)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    # The daemon launches it; it is still running when the next two ticks come.
    run = fake_run(instance, dg.DagsterRunStatus.STARTED, tags=request.tags)
    for minute in (1, 2):
        tick = schedule_tick(defs, instance, raw, minute)
        assert not tick.run_requests
        assert run.run_id in tick.skip_message and "in flight" in tick.skip_message

    # It failed: the next tick tries again (the bound is counted per raw-data fingerprint).
    instance.report_run_failed(instance.get_run_by_id(run.run_id))
    after = schedule_tick(defs, instance, raw, 3)
    assert len(after.run_requests) == 1 and after.run_requests[0].tags[FINGERPRINT_TAG] == raw_folder_fingerprint(raw)


def test_schedule_waits_for_a_retrain_not_yet_started_and_for_a_manual_run_of_the_same_assets(defs, raw, persistent_instance):
    instance = persistent_instance
    for status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING):
        waiting = fake_run(instance, status)
        tick = schedule_tick(defs, instance, raw, 0)
        assert not tick.run_requests and waiting.run_id in tick.skip_message, status
        instance.report_run_canceled(instance.get_run_by_id(waiting.run_id))

    # A "Materialize" click on fine_tuned_model (the UI's asset job) overlaps the retrain's assets.
    manual = fake_run(instance, dg.DagsterRunStatus.STARTED, job_name="__ASSET_JOB",
                      asset_selection={dg.AssetKey("fine_tuned_model")})
    tick = schedule_tick(defs, instance, raw, 1)
    assert not tick.run_requests and manual.run_id in tick.skip_message
    instance.report_run_failed(instance.get_run_by_id(manual.run_id))

    # A run of something else entirely does not hold the retrain back.
    fake_run(instance, dg.DagsterRunStatus.STARTED, job_name="unrelated_job", asset_selection={dg.AssetKey("elsewhere")})
    assert len(schedule_tick(defs, instance, raw, 2).run_requests) == 1


def test_schedule_gives_up_on_a_change_that_keeps_failing(defs, raw, persistent_instance):
    instance = persistent_instance
    graph = LineageGraph.of(defs)
    materialize(graph, instance)
    add_raw_file(raw)
    fingerprint = raw_folder_fingerprint(raw)
    for attempt in range(MAX_RAW_DATA_ATTEMPTS):
        tick = schedule_tick(defs, instance, raw, attempt)
        assert len(tick.run_requests) == 1, attempt
        instance.report_run_failed(fake_run(instance, dg.DagsterRunStatus.STARTED, tags={FINGERPRINT_TAG: fingerprint}))
    gave_up = schedule_tick(defs, instance, raw, MAX_RAW_DATA_ATTEMPTS)
    assert not gave_up.run_requests and f"failed {MAX_RAW_DATA_ATTEMPTS} times" in gave_up.skip_message


def test_schedule_gives_up_on_a_stale_change_that_keeps_failing(defs, raw, persistent_instance):
    instance = persistent_instance
    graph = LineageGraph.of(defs)
    materialize(graph, instance)
    materialize(graph, instance, select={"sft_dataset"}, data_versions={"sft_dataset": "new-content"})
    tick = schedule_tick(defs, instance, raw, 0)
    tags = {k: v for k, v in tick.run_requests[0].tags.items() if k == "sft_pipeline/stale_digest"}
    assert tags
    for _ in range(MAX_RAW_DATA_ATTEMPTS):
        instance.report_run_failed(fake_run(instance, dg.DagsterRunStatus.STARTED, tags=tags))
    gave_up = schedule_tick(defs, instance, raw, 1)
    assert not gave_up.run_requests and "failed" in gave_up.skip_message
    # A further change is a new change: it gets its own attempts.
    materialize(graph, instance, select={"sft_dataset"}, data_versions={"sft_dataset": "newer-content"})
    assert len(schedule_tick(defs, instance, raw, 2).run_requests) == 1


def test_sensor_waits_for_a_retrain_in_flight_and_keeps_the_new_files_for_later(defs, raw):
    instance = dg.DagsterInstance.ephemeral()
    graph = LineageGraph.of(defs)
    materialize(graph, instance)
    repo = defs.get_repository_def()

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, repository_def=repo, cursor=cursor, resources={"raw_data": raw})
        return raw_data_sensor.evaluate_tick(context), context.cursor

    running = fake_run(instance, dg.DagsterRunStatus.STARTED)
    add_raw_file(raw)
    for _ in range(2):
        result, cursor = tick(None)
        assert not result.run_requests and running.run_id in result.skip_message
        assert cursor is None  # the files are still new once the run is done

    instance.report_run_failed(instance.get_run_by_id(running.run_id))
    result, cursor = tick(cursor)
    assert len(result.run_requests) == 1 and result.run_requests[0].run_key == raw_folder_fingerprint(raw)
    assert cursor is not None


def test_sensor_tries_again_when_files_are_touched_after_giving_up(defs, raw):
    instance = dg.DagsterInstance.ephemeral()
    repo = defs.get_repository_def()
    path = add_raw_file(raw)
    fingerprint = raw_folder_fingerprint(raw)

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, repository_def=repo, cursor=cursor, resources={"raw_data": raw})
        return raw_data_sensor.evaluate_tick(context), context.cursor

    _, cursor = tick(None)
    for _ in range(MAX_RAW_DATA_ATTEMPTS):
        instance.report_run_failed(fake_run(instance, dg.DagsterRunStatus.STARTED, tags={FINGERPRINT_TAG: fingerprint}))
    gave_up, cursor = tick(cursor)
    assert not gave_up.run_requests
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000_000))
    again, _ = tick(cursor)
    assert [r.run_key for r in again.run_requests] == [f"{fingerprint}:retry-{MAX_RAW_DATA_ATTEMPTS}"]


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")
def test_a_new_observed_version_of_a_source_asset_makes_its_children_stale():
    """Ready for an observable source asset (e.g. the raw-data folder): its observations count as data versions."""
    from sft_pipeline.defs.automation import stale_assets

    version = {"value": "v1"}

    @dg.observable_source_asset(name="raw_folder")
    def raw_folder():
        return dg.DataVersion(version["value"])

    @dg.asset(deps=[raw_folder], code_version="1")
    def ingested():
        return None

    source_defs = dg.Definitions(assets=[raw_folder, ingested],
                                 jobs=[dg.define_asset_job("observe_raw_folder", selection=[raw_folder])])
    graph = LineageGraph.of(source_defs)
    assert graph.keys == [dg.AssetKey("ingested")]
    instance = dg.DagsterInstance.ephemeral()

    def observe():
        assert source_defs.resolve_job_def("observe_raw_folder").execute_in_process(instance=instance).success

    observe()
    assert dg.materialize([raw_folder, ingested], instance=instance, selection=[ingested]).success
    assert stale_assets(instance, graph) == {}
    observe()  # same version: nothing to do
    assert stale_assets(instance, graph) == {}
    version["value"] = "v2"
    observe()
    assert stale_assets(instance, graph) == {dg.AssetKey("ingested"): ["raw_folder: has a new data version (v1 -> v2)"]}
