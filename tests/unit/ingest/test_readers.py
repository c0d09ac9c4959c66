"""Reading every file format and Hugging Face datasets, and every kind of bad record."""

import json

import pandas as pd
import pytest

from sft_pipeline.ingest.sources import SourceSpec, load_sources
from tests.unit.ingest.samples import ALPACA, DOLLY, MESSAGES, SHAREGPT, write_jsonl


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


def test_oversized_records_are_rejected_unparsed_in_every_format(tmp_path):
    big = {"instruction": "Summarize.", "input": "word " * 400, "output": "Short."}
    small = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    write_jsonl(tmp_path / "a.jsonl", [small, big, "{" + "x" * 5000])  # an oversized line is not even parsed
    (tmp_path / "b.json").write_text(json.dumps([small, big]))
    pd.DataFrame([small, big]).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame([{"messages": [{"role": "user", "content": "q " * 600}, {"role": "assistant", "content": "a"}]}, MESSAGES]).to_parquet(tmp_path / "d.parquet")
    result = load_sources([SourceSpec(str(tmp_path / name)) for name in ("a.jsonl", "b.json", "c.csv", "d.parquet")], max_record_chars=1000)
    oversized = result.rejected[result.rejected["reason"] == "oversized_record"]
    assert sorted(zip(oversized["source"], oversized["source_index"])) == [("a", 2), ("a", 3), ("b", 1), ("c", 1), ("d", 0)]
    assert oversized["detail"].str.contains("max_record_chars=1,000").all()
    assert oversized["raw"].str.len().max() <= 2000
    assert len(result.rows) == 4 and len(result.rows) + len(result.rejected) == sum(result.records_per_source.values()) == 9
    with pytest.raises(ValueError, match="max_record_chars"):
        load_sources([SourceSpec(str(tmp_path / "a.jsonl"))], max_record_chars=0)


def test_wrong_types_and_missing_fields_in_tabular_sources(tmp_path):
    # Parquet keeps types: a numeric output is a wrong type, a null one a missing field.
    pd.DataFrame([
        {"instruction": "A?", "input": None, "output": "a"},
        {"instruction": "B?", "input": None, "output": None},
    ]).to_parquet(tmp_path / "nulls.parquet")
    pd.DataFrame([{"prompt": "Two plus two?", "completion": 4}]).to_parquet(tmp_path / "ints.parquet")
    # CSV: an empty required cell is a missing field.
    (tmp_path / "gaps.csv").write_text("instruction,input,output\nName a color.,,Blue.\nName a shape.,,\n", encoding="utf-8")
    result = load_sources([SourceSpec(str(tmp_path / "nulls.parquet")), SourceSpec(str(tmp_path / "ints.parquet")), SourceSpec(str(tmp_path / "gaps.csv"))])
    reasons = sorted(zip(result.rejected["source"], result.rejected["source_index"], result.rejected["reason"]))
    assert reasons == [("gaps", 1, "missing_field"), ("ints", 0, "wrong_type"), ("nulls", 1, "missing_field")]
    assert list(result.rows["source"]) == ["nulls", "gaps"]


def test_json_file_errors_name_the_file_and_wrapped_lists_are_read(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [ALPACA, 7]}))
    result = load_sources([SourceSpec(str(tmp_path / "wrapped.json"))])
    assert len(result.rows) == 1 and list(result.rejected["reason"]) == ["wrong_type"]
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json"):
        load_sources([SourceSpec(str(tmp_path / "broken.json"))])
    (tmp_path / "latin1.csv").write_bytes("instruction,output\nCaf\xe9?,Yes.\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.csv.*not UTF-8"):
        load_sources([SourceSpec(str(tmp_path / "latin1.csv"))])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt.*unsupported suffix"):
        load_sources([SourceSpec(str(tmp_path / "notes.txt"))])


def test_hugging_face_sources_by_name_split_and_saved_dict(tmp_path):
    import datasets

    # hf://<name> goes through datasets.load_dataset; a local data folder stands in for the hub.
    folder = tmp_path / "org_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [ALPACA, ALPACA | {"output": "Eleven."}])
    write_jsonl(folder / "test.jsonl", [ALPACA | {"output": "Three."}])
    result = load_sources([SourceSpec(f"hf://{folder}", split="test", name="hubby")])
    assert list(result.rows["source"]) == ["hubby"] and result.rows.iloc[0]["response"] == "Three."
    assert list(result.rows["source_index"]) == [0]
    # A saved DatasetDict: the split is chosen; a missing split names the choices.
    datasets.DatasetDict({"train": datasets.Dataset.from_list([SHAREGPT]), "validation": datasets.Dataset.from_list([MESSAGES])}).save_to_disk(str(tmp_path / "dd"))
    result = load_sources([SourceSpec(str(tmp_path / "dd"), split="validation")])
    assert result.rows.iloc[0]["response"] == "4"
    with pytest.raises(ValueError, match="split 'nope'"):
        load_sources([SourceSpec(str(tmp_path / "dd"), split="nope")])


def test_unknown_hub_dataset_fails_naming_it(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nobody-xyz/no-such-dataset"):
        load_sources([SourceSpec("hf://nobody-xyz/no-such-dataset", revision="main")])
