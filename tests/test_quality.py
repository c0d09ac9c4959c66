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
