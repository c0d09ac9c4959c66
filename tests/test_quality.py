"""Great Expectations suites from expectations/*.json."""

import json
import shutil

from sft_pipeline.curation import clean_instructions
from sft_pipeline.ingest import default_sources, load_sources, rows_frame
from sft_pipeline.quality import conversation_view, curation_summary, suite_path, validate_frame
from sft_pipeline.schema import make_row


def test_clean_seed_data_passes_the_clean_suite():
    kept, _, _ = clean_instructions(load_sources(default_sources()).rows)
    result = validate_frame(conversation_view(kept), suite_path("clean_instructions"))
    assert result.success, result.failed


def test_failures_list_each_expectation_with_observed_value():
    rows = rows_frame(
        [
            make_row([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], source="s"),
            make_row([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], source="s"),  # same id
            make_row([{"role": "user", "content": "q"}], source="s"),  # ends on the user
        ]
    )
    result = validate_frame(conversation_view(rows), suite_path("clean_instructions"))
    assert not result.success
    failed = {(o.expectation, o.column) for o in result.failed}
    assert ("expect_column_values_to_be_unique", "id") in failed
    assert ("expect_column_values_to_be_in_set", "last_role") in failed
    assert ("expect_table_row_count_to_be_between", None) in failed
    unique = next(o for o in result.failed if o.expectation == "expect_column_values_to_be_unique")
    assert unique.observed["unexpected_count"] == 2


def test_editing_the_suite_json_changes_behaviour(tmp_path, monkeypatch):
    folder = tmp_path / "expectations"
    shutil.copytree(suite_path("curation_summary").parent, folder)
    summary = curation_summary(rows_in=10, kept=6, rejected=4)
    assert validate_frame(summary, suite_path("curation_summary", folder)).success
    spec = json.loads((folder / "curation_summary.json").read_text())
    for expectation in spec["expectations"]:
        if expectation["kwargs"].get("column") == "rejected_share":
            expectation["kwargs"]["max_value"] = 0.3
    (folder / "curation_summary.json").write_text(json.dumps(spec))
    monkeypatch.setenv("SFT_PIPELINE_EXPECTATIONS", str(folder))
    result = validate_frame(summary, suite_path("curation_summary"))
    assert not result.success and result.failed[0].column == "rejected_share"


def test_accounting_mismatch_fails():
    assert not validate_frame(curation_summary(rows_in=10, kept=6, rejected=3), suite_path("curation_summary")).success


# ---------------------------------------------------------------- deeper: raw suite, ingest accounting, the assets and checks

import dagster as dg  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sft_pipeline.quality import ingest_summary  # noqa: E402


def test_seed_rows_pass_the_raw_suite_and_bad_roles_fail_it():
    rows = load_sources(default_sources()).rows
    assert validate_frame(conversation_view(rows), suite_path("raw_instructions")).success
    bad = rows_frame([make_row([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], source="s")])
    result = validate_frame(conversation_view(bad), suite_path("raw_instructions"))
    failed = {o.column: o for o in result.failed}
    assert "role_sequence" in failed and failed["role_sequence"].observed["sample"] == ["user,tool"]


def test_ingest_summary_bounds_the_unreadable_share():
    assert validate_frame(ingest_summary(10, 9, 1), suite_path("ingest_summary")).success
    result = validate_frame(ingest_summary(10, 5, 5), suite_path("ingest_summary"))
    assert not result.success and result.failed[0].column == "unreadable_share" and result.failed[0].observed["unexpected_count"] == 1
    assert not validate_frame(ingest_summary(10, 5, 4), suite_path("ingest_summary")).success  # one record lost


def test_clean_suite_checks_token_and_length_ranges():
    long_answer = "word " * 9000
    rows = rows_frame([make_row([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": long_answer if i == 0 else f"answer number {i} " * 3}], source="s") for i in range(12)])
    result = validate_frame(conversation_view(rows), suite_path("clean_instructions"))
    failed = {(o.expectation, o.column) for o in result.failed}
    assert ("expect_column_values_to_be_between", "approx_tokens") in failed
    assert ("expect_column_values_to_be_between", "conversation_chars") in failed


@pytest.fixture
def curation_defs(tmp_path):
    from sft_pipeline.assets import curation as stage
    from sft_pipeline.resources import PipelineStorage

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    questions = pd.DataFrame([{
        "question_id": "mmlu-1", "subject": "astronomy", "category": "STEM",
        "question": "Which planet in the solar system has the largest number of confirmed moons orbiting around it today",
        "choices": ["Mars", "Saturn", "Venus", "Earth"], "answer": 1,
    }])
    questions.to_parquet(storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    return stage, storage


def _materialize(stage, storage, run_config):
    assets = [stage.raw_instructions, stage.curated_instructions]
    checks = [stage.raw_instructions_match_expectations, stage.raw_records_readable,
              stage.clean_instructions_match_expectations, stage.every_record_accounted_for]
    return dg.materialize(assets + checks, resources={"storage": storage}, run_config=run_config, raise_on_error=False)


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
    assert set(events) == {"raw_instructions", "clean_instructions", "rejected_instructions"}
    for key, materialization in events.items():
        assert "path" in materialization.metadata, key
        assert materialization.tags.get("dagster/data_version"), key
    clean, rejected = events["clean_instructions"].metadata, events["rejected_instructions"].metadata
    assert clean["records_in"].value == clean["dagster/row_count"].value + rejected["dagster/row_count"].value
    rejected_rows = pd.read_parquet(rejected["path"].path)
    assert set(rejected_rows["reason"]) >= {"malformed_json", "benchmark_contamination"}
    assert "mmlu-1" in rejected_rows.loc[rejected_rows["reason"] == "benchmark_contamination", "detail"].iloc[0]
    for name in ("category_balance", "conversation_tokens", "conversation_chars", "kept_per_source"):
        assert name in clean, name
    for name in ("rejected_per_reason", "rejected_per_source_and_reason", "sample"):
        assert name in rejected, name
    assert all(e.passed for e in result.get_asset_check_evaluations())
    # Same input, same data versions.
    again = _materialize(stage, storage, run_config)
    versions = {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"] for e in again.get_asset_materialization_events()}
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
