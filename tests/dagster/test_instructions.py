"""The ingestion and curation assets and their blocking checks, materialized with Dagster."""

import json

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline.curation.expectations import suite_path
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.outputs import QUESTIONS_FILE, ROWS_FILE, MmluBenchmarkInfo, write_output_folder
from tests.dagster.conftest import materialize_with_stubs


@pytest.fixture
def curation_defs(tmp_path):
    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    questions = pd.DataFrame([{
        "question_id": "mmlu-1", "subject": "astronomy", "category": "STEM",
        "question": "Which planet in the solar system has the largest number of confirmed moons orbiting around it today",
        "choices": ["Mars", "Saturn", "Venus", "Earth"], "answer": 1,
    }])

    def write(folder):
        questions.to_parquet(folder / QUESTIONS_FILE)
        return [QUESTIONS_FILE]

    folder, digest = write_output_folder(storage.asset_dir("mmlu_benchmark"), write)
    benchmark = MmluBenchmarkInfo(path=str(folder), digest=digest, files=(QUESTIONS_FILE,), questions=1)
    return {"mmlu_benchmark": benchmark}, storage


def _materialize(stubs, storage, run_config):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{storage.root}/mlflow.db")
    return materialize_with_stubs(["raw_instructions", "clean_instructions", "rejected_instructions"], stubs, storage, tracking, run_config)


def test_assets_report_data_versions_metadata_and_pass_their_checks(curation_defs, tmp_path):
    stage, storage = curation_defs
    source = tmp_path / "extra.jsonl"
    lines = [json.dumps({"instruction": f"Question number {i} about topic {i}?", "input": "", "output": f"A careful answer to question {i}, with detail."}) for i in range(3)]
    lines += ["{broken", json.dumps({"instruction": "Quiz: which planet in the solar system has the largest number of confirmed moons orbiting around it today?", "input": "", "output": "Saturn."})]
    source.write_text("\n".join(lines) + "\n")
    run_config = {"ops": {"raw_instructions": {"config": {"sources": [{"path": str(source)}, {"path": str(suite_path("raw_instructions").parent.parent / "sft_pipeline" / "data" / "seed_alpaca.jsonl")}]}}}}
    result = _materialize(stage, storage, run_config)
    assert result.success
    events = {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
    assert set(events) == {"raw_instructions", "clean_instructions", "rejected_instructions", "mmlu_benchmark"}
    del events["mmlu_benchmark"]
    for key, materialization in events.items():
        assert "path" in materialization.metadata, key
        assert materialization.tags.get("dagster/data_version"), key
    clean, rejected = events["clean_instructions"].metadata, events["rejected_instructions"].metadata
    assert clean["records_in"].value == clean["dagster/row_count"].value + rejected["dagster/row_count"].value
    rejected_rows = pd.read_parquet(f'{rejected["path"].path}/{ROWS_FILE}')
    assert set(rejected_rows["reason"]) >= {"malformed_json", "benchmark_contamination"}
    assert "mmlu-1" in rejected_rows.loc[rejected_rows["reason"] == "benchmark_contamination", "detail"].iloc[0]
    for name in ("category_balance", "conversation_tokens", "conversation_chars", "kept_per_source"):
        assert name in clean, name
    for name in ("rejected_per_reason", "rejected_per_source_and_reason", "sample"):
        assert name in rejected, name
    assert all(e.passed for e in result.get_asset_check_evaluations())
    # Same input, same data versions.
    again = _materialize(stage, storage, run_config)
    versions = {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"] for e in again.get_asset_materialization_events()
                if e.asset_key.to_user_string() != "mmlu_benchmark"}
    assert versions == {k: m.tags["dagster/data_version"] for k, m in events.items()}


def test_unreadable_share_check_blocks(curation_defs, tmp_path):
    stage, storage = curation_defs
    source = tmp_path / "mostly_broken.jsonl"
    source.write_text("{x\n{y\n" + json.dumps({"prompt": "Name a color.", "completion": "Blue."}) + "\n")
    result = _materialize(stage, storage, {"ops": {"raw_instructions": {"config": {"sources": [{"path": str(source)}]}}}})
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["raw_records_readable"].passed is False
    failed = evaluations["raw_records_readable"].metadata["failed_expectations"].value
    assert failed[0]["column"] == "unreadable_share"
    assert not result.success
