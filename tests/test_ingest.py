"""Reading every input shape and every kind of bad record."""

import json

import pandas as pd
import pytest

from sft_pipeline.ingest import SourceSpec, default_sources, detect_shape, load_sources, to_messages


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


ALPACA = {"instruction": "Name a prime number.", "input": "", "output": "Seven is prime.", "category": "open_qa"}
DOLLY = {"instruction": "Who wrote it?", "context": "The memo was written by Ana.", "response": "Ana wrote it.", "category": "closed_qa"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
MESSAGES = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
PROMPT_COMPLETION = {"prompt": "Translate 'gato' to English.", "completion": "cat"}


@pytest.mark.parametrize(
    "record, shape, expected",
    [
        (ALPACA, "alpaca", [("user", "Name a prime number."), ("assistant", "Seven is prime.")]),
        (DOLLY, "dolly", [("user", "Who wrote it?\n\nThe memo was written by Ana."), ("assistant", "Ana wrote it.")]),
        (SHAREGPT, "sharegpt", [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]),
        (MESSAGES, "messages", [("user", "2+2?"), ("assistant", "4")]),
        (PROMPT_COMPLETION, "prompt_completion", [("user", "Translate 'gato' to English."), ("assistant", "cat")]),
    ],
)
def test_every_shape_is_detected_and_mapped(record, shape, expected):
    assert detect_shape(record) == shape
    assert [(m["role"], m["content"]) for m in to_messages(record, "auto")] == expected


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


def test_bad_records_are_rejected_with_reasons_and_positions(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(ALPACA),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"instruction": "x"}),  # no output: shape unknown
        json.dumps({"instruction": "x", "input": "", "output": 5}),
        json.dumps({"conversations": [{"from": "alien", "value": "hi"}]}),
        json.dumps({"messages": [{"role": "user"}]}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff\xfe"}\n')
    result = load_sources([SourceSpec(str(path))])
    assert len(result.rows) == 1
    reasons = dict(zip(result.rejected["source_index"], result.rejected["reason"]))
    assert reasons == {
        2: "malformed_json",
        3: "wrong_type",
        4: "unknown_shape",
        5: "wrong_type",
        6: "unknown_role",
        7: "wrong_type",
        8: "undecodable_bytes",
    }
    assert result.rejected["raw"].str.len().max() <= 2000
    assert (result.rejected["stage"] == "ingest").all()
    # Nothing lost: every record read is a row or a rejection.
    assert len(result.rows) + len(result.rejected) == result.records_per_source["bad"]


def test_json_csv_parquet_and_column_mapping(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ALPACA, DOLLY]))
    pd.DataFrame([{"question": "Capital of Peru?", "answer": "Lima."}]).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame([MESSAGES]).to_parquet(tmp_path / "c.parquet")
    result = load_sources(
        [
            SourceSpec(str(tmp_path / "a.json")),
            SourceSpec(str(tmp_path / "b.csv"), shape="prompt_completion", columns={"prompt": "question", "completion": "answer"}),
            SourceSpec(str(tmp_path / "c.parquet")),
        ]
    )
    assert result.rejected.empty
    assert list(result.rows["source"]) == ["a", "a", "b", "c"]
    assert result.rows.iloc[2]["messages"] == [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    assert result.rows.iloc[3]["response"] == "4"


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
    assert {"seed_alpaca", "seed_sharegpt"} == set(result.rows["source"])
    multi_turn = result.rows["messages"].map(lambda m: sum(t["role"] == "assistant" for t in m) > 1)
    assert multi_turn.sum() >= 10
