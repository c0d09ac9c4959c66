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


SEED_DIR = suite_path("raw_instructions").parent.parent / "sft_pipeline" / "data"


def _with_seed(*paths):
    return {"ops": {"raw_instructions": {"config": {"sources": [{"path": str(p)} for p in paths] + [{"path": str(SEED_DIR / "seed_alpaca.jsonl")}]}}}}


def test_rows_the_blocking_suites_would_reject_are_quarantined_not_run_stopping(curation_defs, tmp_path):
    stage, storage = curation_defs
    source = tmp_path / "odd.jsonl"

    def convo(*roles, tag):
        return json.dumps({"messages": [{"role": r, "content": f"{tag} turn {i}: " + " ".join(f"w{tag}{i}x{j}" for j in range(8))}
                                        for i, r in enumerate(roles)]})

    source.write_text("\n".join([
        convo("user", "user", "assistant", tag="a"),
        convo("assistant", "user", "assistant", tag="b"),
        convo(*("user", "assistant") * 101, tag="c"),  # 202 turns: over the raw suite's num_turns bound of 200
    ]) + "\n")
    result = _materialize(stage, storage, _with_seed(source))
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    events = {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
    rejected = pd.read_parquet(f'{events["rejected_instructions"].metadata["path"].path}/{ROWS_FILE}')
    odd = rejected[rejected["source"] == "odd"].set_index("source_index")
    assert odd["reason"].to_dict() == {1: "role_order", 2: "assistant_first", 3: "too_many_turns"}
    assert odd.loc[3, "stage"] == "ingest" and "202 turns" in odd.loc[3, "detail"] and "200" in odd.loc[3, "detail"]
    clean = events["clean_instructions"].metadata
    assert clean["records_in"].value == clean["dagster/row_count"].value + events["rejected_instructions"].metadata["dagster/row_count"].value


PERSONAL = ("jane.doe@example.com", "555-867-5309", "bob.smith@example.org", "555-123-4567", "carol@example.net", "555-222-3333")


def test_no_email_or_phone_reaches_the_materialization_metadata(curation_defs, tmp_path):
    stage, storage = curation_defs
    source = tmp_path / "personal.jsonl"
    source.write_text("\n".join([
        json.dumps({"instruction": "Email jane.doe@example.com or call 555-867-5309 about the delayed order?", "input": "",
                    "output": "Write to them today with the order number and ask for a delivery date, then follow up."}),
        json.dumps({"instruction": "Write to bob.smith@example.org at 555-123-4567 pretending to be his bank.", "input": "",
                    "output": "I'm sorry, but I can't help with that request."}),
        '{"instruction": "Mail carol@example.net or 555-222-3333", broken',
    ]) + "\n")
    result = _materialize(stage, storage, _with_seed(source))
    assert result.success
    events = {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
    for key in ("raw_instructions", "clean_instructions", "rejected_instructions"):
        for name, value in events[key].metadata.items():
            text = str(value)
            assert not [p for p in PERSONAL if p in text], (key, name)
    # The redacted text is still shown, and the counts are those of the data.
    raw, clean, rejected = (events[k].metadata for k in ("raw_instructions", "clean_instructions", "rejected_instructions"))
    assert "[EMAIL]" in str(raw["preview"]) and "[PHONE]" in str(raw["preview"])
    assert "[EMAIL]" in str(raw["unreadable_sample"]) and "[EMAIL]" in str(rejected["sample"])
    assert raw["records_read"].value == 3 + 112 and raw["unreadable_records"].value == 1
    assert clean["pii_redactions"].value == {"email": 2, "phone": 2}
    rows = pd.read_parquet(f'{rejected["path"].path}/{ROWS_FILE}')
    personal = rows[rows["source"] == "personal"].set_index("source_index")
    assert personal["reason"].to_dict() == {2: "refusal", 3: "malformed_json"}
    assert clean["records_in"].value == clean["dagster/row_count"].value + rejected["dagster/row_count"].value
