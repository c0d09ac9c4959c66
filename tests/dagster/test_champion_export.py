"""`champion_export` materialized over a stand-in `registered_model`, and `champion_export_sensor` following
the MLflow alias: the champion (not the handed-over version) is exported, an unmoved champion costs nothing,
a promotion or a rollback made in MLflow starts exactly one run, and the export follows it."""

from __future__ import annotations

import dagster as dg
import pytest

from sft_pipeline.defs.automation_export import champion_export_sensor
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.export import ChampionExportInfo
from sft_pipeline.registry import set_alias
from tests.dagster.conftest import materialize_with_stubs
from tests.unit.export.helpers import register_two_versions, train_tiny_adapter

MODEL = "tiny-dagster-export"
QUICK = {"ops": {"champion_export": {"config": {"gguf_quantization": "", "num_prompts": 2, "max_new_tokens": 4}}}}


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    trained = train_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("dagster_export_train"))
    return register_two_versions(trained, tiny_model_dir, tmp_path_factory.mktemp("dagster_export_mlflow"), MODEL)


@pytest.fixture
def setup(store, tmp_path):
    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    tracking = MlflowTracking(tracking_uri=store.uri, registered_model_name=MODEL)
    instance = dg.DagsterInstance.ephemeral()
    yield storage, tracking, instance
    set_alias(store.uri, MODEL, "champion", 1, reason="test: restore")


def materialize(store, storage, tracking, instance, handed_over):
    result = materialize_with_stubs(["champion_export"], {"registered_model": handed_over}, storage, tracking,
                                    run_config=QUICK, instance=instance, raise_on_error=True)
    assert result.success
    info = result.output_for_node("champion_export")
    event = [e for e in result.get_asset_materialization_events()
             if e.asset_key == dg.AssetKey("champion_export")][0].step_materialization_data.materialization
    return info, {k: getattr(v, "value", v) for k, v in event.metadata.items()}


def tick(instance, tracking):
    context = dg.build_sensor_context(instance=instance, resources={"mlflow_tracking": tracking})
    return champion_export_sensor(context)


def test_exports_the_champion_not_the_handed_over_version_and_reuses_it(store, setup):
    storage, tracking, instance = setup
    info, metadata = materialize(store, storage, tracking, instance, store.second)  # version 2 did not win
    assert isinstance(info, ChampionExportInfo) and info.version == 1 and not info.reused
    assert metadata["champion_version"] == 1 and metadata["input_version"] == 2
    assert metadata["path"] == info.path and metadata["merged_path"].endswith("/merged")
    assert metadata["figures"]["merged"]["identical_answers"] == 2 and metadata["figures"]["adapter"]["passed"]
    assert "| merged | verified | 2/2 |" in metadata["verification"]
    assert metadata["vllm_serve_adapter"].startswith("```bash\nvllm serve ")
    assert "gguf_path" not in metadata  # turned off in QUICK

    again, metadata = materialize(store, storage, tracking, instance, store.first)
    assert again.reused and again.path == info.path and metadata["reused"] is True


def test_sensor_follows_the_alias_moved_in_mlflow(store, setup):
    storage, tracking, instance = setup
    skip = tick(instance, tracking)
    assert isinstance(skip, dg.SkipReason) and "never materialized" in skip.skip_message

    first, _ = materialize(store, storage, tracking, instance, store.first)
    skip = tick(instance, tracking)
    assert isinstance(skip, dg.SkipReason) and "already exported" in skip.skip_message

    # promoted by hand in MLflow: no Dagster event, the sensor alone notices
    set_alias(store.uri, MODEL, "champion", 2, reason="test: promote by hand")
    request = tick(instance, tracking)
    assert isinstance(request, dg.RunRequest) and request.asset_selection == [dg.AssetKey("champion_export")]
    assert request.tags["sft_pipeline/champion_version"] == "2"
    assert tick(instance, tracking).run_key == request.run_key  # the same move, the same run key: one run
    second, metadata = materialize(store, storage, tracking, instance, store.first)
    assert second.version == 2 and metadata["champion_version"] == 2 and second.path != first.path
    assert isinstance(tick(instance, tracking), dg.SkipReason)

    # a rollback to a version exported before: a new run (new run key), whose export is the earlier folder reused
    set_alias(store.uri, MODEL, "champion", 1, reason="test: roll back")
    rollback = tick(instance, tracking)
    assert isinstance(rollback, dg.RunRequest) and rollback.run_key != request.run_key
    back, metadata = materialize(store, storage, tracking, instance, store.first)
    assert back.version == 1 and back.reused and back.path == first.path
    assert isinstance(tick(instance, tracking), dg.SkipReason)


def test_sensor_waits_for_a_run_in_flight(store, setup):
    storage, tracking, instance = setup
    materialize(store, storage, tracking, instance, store.first)
    set_alias(store.uri, MODEL, "champion", 2, reason="test: promote by hand")
    instance.add_run(dg.DagsterRun(job_name="sft_pipeline_job", run_id="in-flight-retrain",
                                   status=dg.DagsterRunStatus.STARTED))
    skip = tick(instance, tracking)
    assert isinstance(skip, dg.SkipReason) and "in-flight-retrain" in skip.skip_message


def test_sensor_skips_without_a_champion(tmp_path):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/empty.db", registered_model_name="nothing-here")
    skip = tick(dg.DagsterInstance.ephemeral(), tracking)
    assert isinstance(skip, dg.SkipReason) and "no version of nothing-here is aliased champion" in skip.skip_message


def test_no_champion_materializes_an_empty_export_that_says_so(store, setup):
    import dataclasses

    storage, tracking, instance = setup
    nobody = dataclasses.replace(store.first, model_name="never-registered")
    info, metadata = materialize(store, storage, tracking, instance, nobody)
    assert not info.exported and info.version is None
    assert metadata["champion_version"] == -1 and "nothing to export" in metadata["note"]
    assert metadata["path"].endswith("champion_export")
