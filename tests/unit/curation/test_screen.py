"""Ingested rows outside the raw_instructions suite's per-row bounds become ingest rejects."""

import json

from sft_pipeline.curation.expectations import column_range, conversation_view, suite_path, validate_frame
from sft_pipeline.curation.screen import screen_rows
from sft_pipeline.ingest.sources import default_sources, load_sources
from sft_pipeline.schema import make_row
from tests.unit.curation.samples import frame


def _conversation(turns, chars_per_turn=20, index=0):
    messages = [{"role": ("user", "assistant")[i % 2], "content": "x" * chars_per_turn} for i in range(turns)]
    return make_row(messages, source="s", source_file="s.jsonl", source_index=index)


def test_rows_the_raw_suite_rejects_are_screened_with_reasons_and_the_rest_pass_it():
    _, max_turns = column_range(suite_path("raw_instructions"), "num_turns")
    _, max_chars = column_range(suite_path("raw_instructions"), "conversation_chars")
    assert (max_turns, max_chars) == (200, 1_000_000)
    seed = load_sources(default_sources()).rows
    odd = frame(_conversation(202, index=1), _conversation(2, chars_per_turn=600_000, index=2), _conversation(200, index=3))
    rows = frame(*seed.to_dict("records"), *odd.to_dict("records"))
    # Reproduces the defect: one such row fails the blocking raw suite for the whole table.
    assert not validate_frame(conversation_view(rows), suite_path("raw_instructions")).success
    kept, rejected = screen_rows(rows, suite_path("raw_instructions"))
    assert len(kept) + len(rejected) == len(rows)
    assert dict(zip(rejected["source_index"], rejected["reason"])) == {1: "too_many_turns", 2: "too_long"}
    assert set(rejected["stage"]) == {"ingest"} and rejected["id"].notna().all()
    assert "202 turns, more than 200" in rejected["detail"].iloc[0] and "raw_instructions.json" in rejected["detail"].iloc[0]
    assert validate_frame(conversation_view(kept), suite_path("raw_instructions")).success


def test_the_screen_follows_the_suite_file(tmp_path):
    spec = json.loads(suite_path("raw_instructions").read_text())
    for entry in spec["expectations"]:
        if entry["kwargs"].get("column") == "num_turns":
            entry["kwargs"]["max_value"] = 4
    path = tmp_path / "raw_instructions.json"
    path.write_text(json.dumps(spec))
    kept, rejected = screen_rows(frame(_conversation(4, index=1), _conversation(6, index=2)), path)
    assert kept["source_index"].tolist() == [1] and rejected["reason"].tolist() == ["too_many_turns"]
    kept, rejected = screen_rows(frame(_conversation(2, index=1)), path)
    assert len(kept) == 1 and len(rejected) == 0
