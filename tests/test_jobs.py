"""Jobs, the nightly schedule and the raw-data sensor: retrain only when data or code versions changed.

The real schedule and sensor are evaluated against the real asset graph on an ephemeral instance.
Materializations come from fast stand-ins: assets with the same keys, parents and code versions
as the real ones, so Dagster's staleness bookkeeping is exactly what a real run leaves behind,
without training anything.
"""

import datetime
import json
import os
from pathlib import Path

import dagster as dg
import pytest

from sft_pipeline.definitions import build_definitions
from sft_pipeline.resources import MlflowTracking, PipelineStorage, RawDataFolder
from sft_pipeline.sensors import (
    FINGERPRINT_TAG,
    raw_data_sensor,
    raw_folder_fingerprint,
    raw_sources_run_config,
    retrain_decision,
)


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


def stand_ins(asset_graph, data_versions: dict[str, str] | None = None) -> list[dg.AssetsDefinition]:
    """One trivial asset per real asset: same key, parents and code version; optional fixed data versions."""
    data_versions = data_versions or {}
    out = []
    for key in asset_graph.materializable_asset_keys:
        node = asset_graph.get(key)
        name = key.to_user_string()

        out.append(dg.asset(name=name, deps=list(node.parent_keys), code_version=node.code_version)(_compute(data_versions.get(name))))
    return out


def _compute(version: str | None):
    def compute():
        return dg.MaterializeResult(data_version=dg.DataVersion(version) if version else None)

    return compute


def materialize(asset_graph, instance, select=None, data_versions=None, tags=None):
    assets = stand_ins(asset_graph, data_versions)
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


def test_decision_follows_data_and_code_versions(defs, raw):
    graph = defs.resolve_asset_graph()
    instance = dg.DagsterInstance.ephemeral()

    first = retrain_decision(instance, graph, raw)
    assert first.run and names(first.asset_selection) == names(graph.materializable_asset_keys)
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
    assert names(changed.asset_selection) == {"fine_tuned_model", "model_evaluation", "registered_model"}
    assert any("sft_dataset" in cause for cause in changed.stale["fine_tuned_model"])


def test_decision_sees_code_version_changes(defs, raw):
    graph = defs.resolve_asset_graph()
    instance = dg.DagsterInstance.ephemeral()
    materialize(graph, instance)
    # Record registered_model as materialized by an older code version: the current code is newer.
    old = [a for a in stand_ins(graph) if a.key.to_user_string() == "registered_model"][0]
    older = dg.asset(name="registered_model", deps=list(graph.get(old.key).parent_keys), code_version="0")(lambda: None)
    assert dg.materialize([older], instance=instance).success
    decision = retrain_decision(instance, graph, raw)
    assert decision.run and names(decision.asset_selection) == {"registered_model"}
    assert "code version" in " ".join(decision.stale["registered_model"])


def test_new_raw_files_retrain_once(defs, raw):
    graph = defs.resolve_asset_graph()
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
    graph = defs.resolve_asset_graph()
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
    graph = defs.resolve_asset_graph()
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
    from sft_pipeline.sensors import FINGERPRINT_TAG, MAX_RAW_DATA_ATTEMPTS

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
