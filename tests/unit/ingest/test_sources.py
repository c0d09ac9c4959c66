"""Sources: files, globs and saved datasets, provenance and stable ids, the packaged seed set."""

import pandas as pd
import pytest

from sft_pipeline.ingest.sources import SourceSpec, default_sources, load_sources
from tests.unit.ingest.samples import ALPACA, DOLLY, MESSAGES, PROMPT_COMPLETION, SHAREGPT, write_jsonl


def test_jsonl_rows_keep_provenance_and_stable_ids(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, DOLLY, SHAREGPT])
    first = load_sources([SourceSpec(str(path), name="mine")])
    second = load_sources([SourceSpec(str(path), name="mine")])
    rows = first.rows
    assert list(rows["source_index"]) == [1, 2, 3]  # JSONL positions are line numbers
    assert set(rows["source"]) == {"mine"} and set(rows["source_file"]) == {str(path)}
    assert list(rows["category"][:2]) == ["open_qa", "closed_qa"]
    assert list(rows["id"]) == list(second.rows["id"])
    assert rows["id"].is_unique
    assert first.records_per_source == {"mine": 3}


def test_glob_and_saved_dataset(tmp_path):
    import datasets

    write_jsonl(tmp_path / "part-1.jsonl", [ALPACA])
    write_jsonl(tmp_path / "part-2.jsonl", [DOLLY])
    datasets.Dataset.from_list([PROMPT_COMPLETION]).save_to_disk(str(tmp_path / "saved"))
    result = load_sources([SourceSpec(str(tmp_path / "part-*.jsonl"), name="parts"), SourceSpec(str(tmp_path / "saved"))])
    assert list(result.rows["source"]) == ["parts", "parts", "saved"]
    assert result.rows.iloc[2]["response"] == "cat"


def test_missing_file_names_it_and_empty_source_is_fine(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sources([SourceSpec(str(tmp_path / "nope.jsonl"))])
    with pytest.raises(FileNotFoundError, match="matched no"):
        load_sources([SourceSpec(str(tmp_path / "none-*.jsonl"))])
    (tmp_path / "empty.jsonl").write_text("")
    result = load_sources([SourceSpec(str(tmp_path / "empty.jsonl"))])
    assert result.rows.empty and result.rejected.empty and result.records_per_source == {"empty": 0}


def test_bad_shape_config_is_rejected():
    with pytest.raises(ValueError, match="shape must be one of"):
        SourceSpec("x.jsonl", shape="alpacca")


def test_packaged_seed_set_is_large_diverse_and_clean():
    result = load_sources(default_sources())
    assert result.rejected.empty, result.rejected[["source_index", "reason", "detail"]]
    assert len(result.rows) >= 150
    categories = result.rows["category"].value_counts()
    for category in ["open_qa", "closed_qa", "classification", "summarization", "information_extraction", "brainstorming", "creative_writing", "code"]:
        assert categories.get(category, 0) >= 10, category
    assert {"seed_alpaca", "seed_sharegpt", "ticket_triage"} == set(result.rows["source"])
    # The task set: balanced queues and urgencies, every answer the JSON the task metrics parse.
    import json

    triage = result.rows[result.rows["source"] == "ticket_triage"]
    answers = [json.loads(r) for r in triage["response"]]
    assert len(triage) >= 400 and set(triage["category"]) == {"ticket_triage"}
    queues = pd.Series([a["queue"] for a in answers]).value_counts()
    assert set(queues.index) == {"billing", "technical", "account", "shipping", "refund"} and queues.max() - queues.min() <= 5
    assert set(a["urgency"] for a in answers) == {"low", "medium", "high"}
    multi_turn = result.rows["messages"].map(lambda m: sum(t["role"] == "assistant" for t in m) > 1)
    assert multi_turn.sum() >= 10


def test_sources_merge_in_order_with_provenance_and_empty_sources_count_zero(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", [ALPACA, "{bad"])
    (tmp_path / "two.json").write_text("[]")
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "completion": pd.Series([], dtype=str)}).to_parquet(tmp_path / "three.parquet")
    write_jsonl(tmp_path / "four.jsonl", [MESSAGES])
    specs = [SourceSpec(str(tmp_path / n)) for n in ("one.jsonl", "two.json", "three.parquet", "four.jsonl")]
    result = load_sources(specs)
    assert result.records_per_source == {"one": 2, "two": 0, "three": 0, "four": 1}
    assert list(zip(result.rows["source"], result.rows["source_index"])) == [("one", 1), ("four", 1)]
    assert list(zip(result.rejected["source"], result.rejected["source_index"], result.rejected["reason"])) == [("one", 2, "malformed_json")]
    assert result.rejected.iloc[0]["raw"] == "{bad\n" and result.rejected.iloc[0]["source_file"] == str(tmp_path / "one.jsonl")
