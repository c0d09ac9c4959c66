"""Great Expectations suites from expectations/*.json."""

import json
import shutil

import pytest

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


def _suite_copy(tmp_path, name, edit):
    spec = json.loads(suite_path(name).read_text())
    edit(spec["expectations"])
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_a_misspelled_expectation_fails_the_suite_naming_the_file_and_the_entry(tmp_path):
    def misspell(expectations):
        expectations[1]["type"] = "expect_column_values_to_be_betwen"

    path = _suite_copy(tmp_path, "curation_summary", misspell)
    # 62.5% rejected: over the suite's 50% bound, which the misspelled entry was meant to enforce.
    result = validate_frame(curation_summary(rows_in=8, kept=3, rejected=5), path)
    assert not result.success
    bad = [o for o in result.failed if o.expectation == "expect_column_values_to_be_betwen"]
    assert len(bad) == 1 and bad[0].column == "rejected_share"
    assert str(path) in bad[0].observed and "expectations[1]" in bad[0].observed
    assert "not found" in bad[0].observed or "unknown" in bad[0].observed
    # The well-formed entry is still evaluated.
    assert any(o.expectation == "expect_column_pair_values_to_be_equal" and o.success for o in result.outcomes)


def test_an_entry_with_bad_arguments_fails_the_suite_instead_of_raising(tmp_path):
    def break_kwargs(expectations):
        expectations[1]["kwargs"]["colum"] = expectations[1]["kwargs"].pop("column")

    path = _suite_copy(tmp_path, "curation_summary", break_kwargs)
    result = validate_frame(curation_summary(rows_in=10, kept=9, rejected=1), path)
    assert not result.success
    assert [o.expectation for o in result.failed] == ["expect_column_values_to_be_between"]
    assert str(path) in result.failed[0].observed and "expectations[1]" in result.failed[0].observed


def test_fewer_evaluated_expectations_than_declared_fails(tmp_path, monkeypatch):
    import great_expectations.core.expectation_validation_result as results

    path = suite_path("curation_summary")
    real = results.ExpectationSuiteValidationResult.__init__

    def drop_one(self, *args, **kwargs):  # stands in for GE skipping an expectation without a word
        real(self, *args, **kwargs)
        self.results = self.results[:-1]

    monkeypatch.setattr(results.ExpectationSuiteValidationResult, "__init__", drop_one)
    result = validate_frame(curation_summary(rows_in=10, kept=9, rejected=1), path)
    assert not result.success
    assert any("declares 2 expectations" in str(o.observed) and "1 evaluated" in str(o.observed) and str(path) in str(o.observed)
               for o in result.failed)


def test_a_suite_without_expectations_is_an_error_naming_its_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"name": "empty", "expectations": []}))
    with pytest.raises(ValueError, match="empty.json"):
        validate_frame(curation_summary(rows_in=10, kept=9, rejected=1), path)
