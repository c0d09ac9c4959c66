"""The clean_instructions stage: every row kept or rejected, provenance, order, empty input."""

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.schema import make_row
from tests.unit.curation.samples import frame, row


def test_every_row_is_kept_or_rejected_with_a_reason():
    rows = frame(
        row("Say hi", "Hi!", index=1),
        row("Say hi", "  hi!  ", index=2),  # exact duplicate after case/whitespace folding
        row("Empty answer", " \u200b ", index=3),
        row("Long", "x" * 20_000, index=4),
        make_row([{"role": "user", "content": "no answer"}], source="t", source_index=5),
        make_row([{"role": "assistant", "content": "no question"}], source="t", source_index=6),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig(near_dedup=False))
    assert list(kept["source_index"]) == [1]
    assert dict(zip(rejected["source_index"], rejected["reason"])) == {
        2: "exact_duplicate",
        3: "empty_response",
        4: "too_long",
        5: "no_final_assistant",
        6: "no_user_turn",
    }
    assert kept.iloc[0]["id"] in rejected.set_index("source_index").loc[2, "detail"]
    assert report.rows_in == len(kept) + len(rejected) == 6


def test_empty_input_gives_empty_frames_with_schema():
    kept, rejected, report = clean_instructions(frame(), CurationConfig())
    assert kept.empty and rejected.empty and "messages" in kept.columns and "reason" in rejected.columns
    assert report.rows_in == 0


def test_rejected_rows_keep_position_raw_text_and_follow_input_order():
    rows = frame(
        row("Say hi", "Hi!", index=10),
        row("Q", "", index=11),
        row("Say hi", "Hi!", index=12),
        row("x" * 5000, "y" * 9000, index=13),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig())
    assert list(rejected["source_index"]) == [11, 12, 13]
    assert (rejected["stage"] == "curation").all() and rejected["raw"].str.len().max() <= 2000
    assert rejected.iloc[0]["raw"].startswith("[{")  # the raw conversation as JSON
    assert report.rows_in == len(kept) + len(rejected)


def test_kept_rows_keep_provenance_and_get_fresh_ids():
    rows = frame(row("  Hello\u200b   world  ", "<b>Hi</b>", index=3, source="src"))
    rows["extra_column"] = ["kept"]
    kept, _, _ = clean_instructions(rows, CurationConfig())
    assert kept.iloc[0]["messages"] == [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi"}]
    assert kept.iloc[0]["source_file"] == "src.jsonl" and kept.iloc[0]["source_index"] == 3 and kept.iloc[0]["extra_column"] == "kept"
    assert kept.iloc[0]["id"] != rows.iloc[0]["id"] and kept.iloc[0]["prompt"] == "Hello world"


def test_the_packaged_triage_set_has_no_duplicates_or_near_duplicates():
    """Written, not generated from a few patterns: exact and MinHash near-dedup find nothing to remove."""
    from sft_pipeline.ingest.sources import PACKAGE_DATA, SourceSpec, load_sources

    rows = load_sources([SourceSpec(path=str(PACKAGE_DATA / "ticket_triage.jsonl"))]).rows
    kept, rejected, report = clean_instructions(rows, CurationConfig())
    assert len(rows) >= 400 and len(kept) == len(rows), rejected[["reason", "detail"]].head()
    assert report.lsh_bands[0] > 0  # near-duplicate detection ran over the set
