"""Assets called directly, a materialized slice with a blocking check, and the whole graph on a tiny model."""

import json
import math
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline.definitions import build_definitions
from sft_pipeline.defs.instructions import RawInstructionsConfig, SourceConfig, raw_instructions
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.outputs import (
    ROWS_FILE,
    BaseModelEvaluationInfo,
    CleanInstructionsInfo,
    MmluBenchmarkInfo,
    ModelEvaluationInfo,
    OutputInfo,
    RawInstructionsInfo,
    RejectedInstructionsInfo,
    SyntheticInstructionsInfo,
)
from sft_pipeline.registry.register import RegistrationInfo
from sft_pipeline.tokenization import SftDatasetInfo
from sft_pipeline.training import TrainingResult


@pytest.fixture
def storage(tmp_path):
    return PipelineStorage(root=str(tmp_path / "artifacts"))


@pytest.fixture
def tracking(tmp_path):
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registered_model_name="tiny_sft")


def tiny_run_config(model_dir: Path, **overrides) -> dict:
    ops = {
        "base_model": {"config": {"source": str(model_dir)}},
        "mmlu_benchmark": {"config": {"subjects": ["astronomy", "marketing"], "questions_per_subject": 4}},
        "synthetic_instructions": {"config": {"num_instructions": 2, "max_attempts": 4, "max_new_tokens_instruction": 16, "max_new_tokens_response": 16}},
        "sft_dataset": {"config": {"max_length": 1024}},
        "fine_tuned_model": {"config": {"max_steps": 3, "eval_steps": 2, "per_device_train_batch_size": 4}},
        "base_model_evaluation": {"config": {"batch_size": 4}},
        "model_evaluation": {"config": {"batch_size": 4}},
    }
    ops.update(overrides)
    return {"ops": ops}


def test_raw_instructions_called_directly(storage, tmp_path):
    source = tmp_path / "tickets.jsonl"
    source.write_text(
        json.dumps({"instruction": "Reset my password", "input": "", "output": "Use the 'Forgot password' link."}) + "\n{broken\n"
    )
    result = raw_instructions(RawInstructionsConfig(sources=[SourceConfig(path=str(source), name="tickets")]), storage)
    assert result.metadata["dagster/row_count"] == 1
    assert result.metadata["unreadable_records"] == 1
    info = result.value
    assert isinstance(info, RawInstructionsInfo) and info.rows == 1 and info.unreadable == 1
    assert result.data_version.value == info.digest
    info.verify()
    rows = pd.read_parquet(info.file(ROWS_FILE))
    assert list(rows["source"]) == ["tickets"]


def test_blocking_check_stops_the_run_before_training(storage, tracking, tmp_path, tiny_model_dir):
    # Three rows: fewer than the clean_instructions suite's minimum, so its blocking check fails.
    source = tmp_path / "small.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}) for i in range(3)) + "\n")
    defs = build_definitions(storage, tracking)
    selection = ["raw_instructions", "mmlu_benchmark", "clean_instructions", "rejected_instructions", "base_model", "synthetic_instructions"]
    run_config = tiny_run_config(tiny_model_dir, raw_instructions={"config": {"sources": [{"path": str(source)}]}})
    run_config["ops"] = {k: v for k, v in run_config["ops"].items() if k in selection}
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in selection})
    result = job.execute_in_process(run_config=run_config, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["clean_instructions_match_expectations"].passed is False
    failed = evaluations["clean_instructions_match_expectations"].metadata["failed_expectations"].value
    assert failed[0]["expectation"] == "expect_table_row_count_to_be_between" and failed[0]["observed"] == 3
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "clean_instructions" in materialized
    assert "synthetic_instructions" not in materialized


@pytest.mark.slow
def test_whole_graph_on_a_tiny_model(storage, tracking, tiny_model_dir):
    import mlflow

    defs = build_definitions(storage, tracking)
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def("sft_pipeline_job")
    result = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=instance)
    assert result.success

    materialized = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(materialized) == {
        "raw_instructions", "clean_instructions", "rejected_instructions", "synthetic_instructions", "base_model",
        "sft_dataset", "fine_tuned_model", "mmlu_benchmark", "base_model_evaluation", "model_evaluation", "registered_model",
        "champion_export",
    }
    for key, metadata in materialized.items():
        assert "path" in metadata, key
    assert all(e.passed for e in result.get_asset_check_evaluations())

    assert materialized["raw_instructions"]["dagster/row_count"].value >= 150
    clean_rows = materialized["clean_instructions"]["dagster/row_count"].value
    assert clean_rows + materialized["rejected_instructions"]["dagster/row_count"].value == materialized["clean_instructions"]["records_in"].value
    assert materialized["mmlu_benchmark"]["dagster/row_count"].value == 8

    train_loss = materialized["fine_tuned_model"]["train_loss"].value
    assert math.isfinite(train_loss) and train_loss > 0
    adapter_dir = Path(materialized["fine_tuned_model"]["path"].path)
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()

    predictions = pd.read_parquet(Path(materialized["model_evaluation"]["path"].path) / "predictions.parquet")
    # Every asset's hand-off loads outside a run, the way a notebook user would load it.
    expected_types = {
        "raw_instructions": RawInstructionsInfo, "clean_instructions": CleanInstructionsInfo,
        "rejected_instructions": RejectedInstructionsInfo, "synthetic_instructions": SyntheticInstructionsInfo,
        "mmlu_benchmark": MmluBenchmarkInfo, "base_model": BaseModelInfo, "sft_dataset": SftDatasetInfo,
        "fine_tuned_model": TrainingResult, "base_model_evaluation": BaseModelEvaluationInfo,
        "model_evaluation": ModelEvaluationInfo, "registered_model": RegistrationInfo,
    }
    for key, cls in expected_types.items():
        value = defs.load_asset_value(key, instance=instance)
        assert isinstance(value, cls), key
        if isinstance(value, OutputInfo):
            value.verify()
    # What `make demo` prints from these hand-offs: the comparison with intervals, examples, the registration.
    from sft_pipeline.demo import comparison_lines, example_lines, registration_line

    evaluation = defs.load_asset_value("model_evaluation", instance=instance)
    table = "\n".join(comparison_lines(evaluation))
    assert "exact match (primary)" in table and "MMLU accuracy" in table and "held-out loss" in table
    examples = example_lines(evaluation, defs.load_asset_value("sft_dataset", instance=instance))
    assert len(examples) == 12 and examples[1].strip().startswith('expected  {"queue": ')
    assert registration_line(defs.load_asset_value("registered_model", instance=instance)).startswith("tiny_sft version 1")
    clean_loaded = defs.load_asset_value("clean_instructions", instance=instance)
    assert clean_loaded.rows == clean_rows == len(pd.read_parquet(clean_loaded.file(ROWS_FILE)))
    assert defs.load_asset_value("fine_tuned_model", instance=instance).weights_hash
    assert defs.load_asset_value("registered_model", instance=instance).version == 1
    assert len(predictions) == 8 and set(predictions["predicted"]) <= set("ABCD")
    assert 0.0 <= materialized["model_evaluation"]["mmlu_accuracy"].value <= 1.0

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri)
    version = client.get_model_version_by_alias("tiny_sft", "candidate")
    assert int(version.version) == materialized["registered_model"]["version"].value == 1
    assert version.tags["dagster_run_id"] == result.run_id
    training_run = client.get_run(materialized["fine_tuned_model"]["mlflow_run_id"].value)
    assert training_run.data.tags["dagster_run_id"] == result.run_id
    assert len(client.get_metric_history(training_run.info.run_id, "train_loss")) == 3

    # A second run with other training settings reuses the converted base model and the base
    # model's evaluation, and registers a second version.
    retrain = tiny_run_config(
        tiny_model_dir,
        fine_tuned_model={"config": {"max_steps": 4, "eval_steps": 2}},
        sft_dataset={"config": {"max_length": 1024, "synthetic_ratio": 0.0}},
    )
    second = job.execute_in_process(run_config=retrain, instance=instance)
    assert second.success
    again = {e.asset_key.to_user_string(): e.materialization.metadata for e in second.get_asset_materialization_events()}
    assert again["base_model"]["reused"].value is True
    assert again["base_model_evaluation"]["reused"].value is True
    assert again["registered_model"]["version"].value == 2
    # synthetic_ratio 0 trains on the human rows alone.
    assert again["sft_dataset"]["synthetic_rows"].value == 0
    assert again["sft_dataset"]["human_rows"].value == clean_rows
