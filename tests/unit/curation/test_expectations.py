"""Great Expectations suites from expectations/*.json."""

import json
import shutil

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.expectations import conversation_view, curation_summary, ingest_summary, suite_path, validate_frame
from sft_pipeline.ingest.frames import rows_frame
from sft_pipeline.ingest.sources import default_sources, load_sources
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
