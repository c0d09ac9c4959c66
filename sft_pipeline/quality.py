"""Compatibility shim: the Great Expectations code now lives in `sft_pipeline.curation.expectations`.

Kept while the Dagster layer still imports `sft_pipeline.quality`; to be removed with that import.
"""

from sft_pipeline.curation.expectations import (
    EXPECTATIONS_DIR,
    ExpectationOutcome,
    SuiteResult,
    conversation_view,
    curation_summary,
    ingest_summary,
    load_suite,
    suite_path,
    validate_frame,
)

__all__ = [
    "EXPECTATIONS_DIR",
    "ExpectationOutcome",
    "SuiteResult",
    "conversation_view",
    "curation_summary",
    "ingest_summary",
    "load_suite",
    "suite_path",
    "validate_frame",
]
