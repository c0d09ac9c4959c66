"""Reading every file format and Hugging Face datasets, and every kind of bad record."""

import codecs
import gzip
import json

import pandas as pd
import pytest

from sft_pipeline.ingest.readers import read_jsonl
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


# Files as real users have them: byte-order marks, UTF-16, gzip, ragged CSV rows, empty files.


def test_utf8_bom_costs_no_record_in_jsonl_json_and_csv(tmp_path):
    bom = codecs.BOM_UTF8
    (tmp_path / "a.jsonl").write_bytes(bom + (json.dumps(ALPACA) + "\n" + json.dumps(DOLLY) + "\n").encode())
    (tmp_path / "b.json").write_bytes(bom + json.dumps([ALPACA]).encode())
    (tmp_path / "c.csv").write_bytes(bom + b"instruction,input,output\nName a color.,,Blue.\n")
    result = load_sources([SourceSpec(str(tmp_path / n)) for n in ("a.jsonl", "b.json", "c.csv")])
    assert result.rejected.empty, result.rejected[["source", "reason", "detail"]]
    assert list(zip(result.rows["source"], result.rows["source_index"])) == [("a", 1), ("a", 2), ("b", 0), ("c", 0)]
    assert result.rows.iloc[3]["prompt"] == "Name a color." and result.rows.iloc[3]["response"] == "Blue."


def test_utf16_and_utf32_with_a_bom_are_read_and_without_one_named_as_not_utf8(tmp_path):
    text = json.dumps(ALPACA, ensure_ascii=False).replace("prime", "primé") + "\n" + json.dumps(DOLLY) + "\n"
    (tmp_path / "le.jsonl").write_bytes(text.encode("utf-16"))  # Python writes a BOM, like Notepad and PowerShell
    (tmp_path / "be.json").write_bytes(codecs.BOM_UTF16_BE + json.dumps([ALPACA]).encode("utf-16-be"))
    (tmp_path / "u32.csv").write_bytes("instruction,output\nCafé?,Oui.\n".encode("utf-32"))
    result = load_sources([SourceSpec(str(tmp_path / n)) for n in ("le.jsonl", "be.json", "u32.csv")])
    assert result.rejected.empty, result.rejected[["source", "reason", "detail"]]
    assert list(result.rows["source_index"]) == [1, 2, 0, 0]
    assert "primé" in result.rows.iloc[0]["prompt"] and result.rows.iloc[3]["prompt"] == "Café?"
    # A file longer than one read chunk: no line is split or lost at a chunk boundary.
    long_lines = [json.dumps({"prompt": f"q{i} é", "completion": "a"}) for i in range(30_000)]
    (tmp_path / "long.jsonl").write_bytes("\n".join(long_lines).encode("utf-16"))
    items = list(read_jsonl(tmp_path / "long.jsonl"))
    assert [item[2].rstrip("\n") for item in items] == long_lines and items[-1][0] == 30_000
    # A bad code unit is named by its line.
    (tmp_path / "bad16.jsonl").write_bytes(("{}\n" * 3).encode("utf-16") + "\ud800".encode("utf-16-le", "surrogatepass") + b"{\x00}\x00")
    with pytest.raises(ValueError, match=r"bad16.jsonl: line 4 is not valid UTF-16"):
        load_sources([SourceSpec(str(tmp_path / "bad16.jsonl"))])
    for name in ("bare.jsonl", "bare.json", "bare.csv"):
        (tmp_path / name).write_bytes(text.encode("utf-16-le"))
        with pytest.raises(ValueError, match=rf"{name}.*not UTF-8.*UTF-16"):
            load_sources([SourceSpec(str(tmp_path / name))])


def test_gzip_files_are_read_transparently_also_through_globs_and_folders(tmp_path):
    with gzip.open(tmp_path / "part-1.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(ALPACA) + "\n{bad\n")
    with gzip.open(tmp_path / "part-2.json.gz", "wb") as handle:
        handle.write(codecs.BOM_UTF8 + json.dumps([SHAREGPT]).encode())
    with gzip.open(tmp_path / "part-3.csv.gz", "wt", encoding="utf-8", newline="") as handle:
        handle.write("prompt,completion\r\n\"Say \"\"hi\"\", twice\",\"hi\nhi\"\r\n")
    result = load_sources([SourceSpec(str(tmp_path / "part-*"), name="parts")])
    assert list(zip(result.rows["source_file"].map(lambda f: f.rsplit("/", 1)[1]), result.rows["source_index"])) == [
        ("part-1.jsonl.gz", 1), ("part-2.json.gz", 0), ("part-3.csv.gz", 0)
    ]
    assert result.rows.iloc[2]["prompt"] == 'Say "hi", twice' and result.rows.iloc[2]["response"] == "hi\nhi"
    assert list(zip(result.rejected["source_index"], result.rejected["reason"])) == [(2, "malformed_json")]
    assert result.records_per_source == {"parts": 4}
    # A folder source picks them up too, and a lone file is named by its stem without the suffixes.
    assert load_sources([SourceSpec(str(tmp_path))]).records_per_source == {tmp_path.name: 4}
    assert set(load_sources([SourceSpec(str(tmp_path / "part-1.jsonl.gz"))]).rows["source"]) == {"part-1"}
    # gzip is recognised by its content, so a compressed file that lost its .gz is read too.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "nogz.jsonl").write_bytes((tmp_path / "part-1.jsonl.gz").read_bytes())
    assert list(load_sources([SourceSpec(str(tmp_path / "other" / "nogz.jsonl"))]).rows["prompt"]) == [ALPACA["instruction"]]
    # A truncated or mislabelled gzip file is an error naming the file.
    data = (tmp_path / "part-1.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jsonl.gz"):
        load_sources([SourceSpec(str(tmp_path / "cut.jsonl.gz"))])
    (tmp_path / "plain.csv.gz").write_text("prompt,completion\na,b\n")
    with pytest.raises(ValueError, match="plain.csv.gz.*not gzip"):
        load_sources([SourceSpec(str(tmp_path / "plain.csv.gz"))])


def test_csv_rows_with_the_wrong_field_count_are_rejected_with_their_line_and_good_rows_kept(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text(
        "instruction,input,output\n"
        "Name a color, please.,,Blue.\n"  # unquoted comma in the first data row: pandas shifted every row
        "Name a shape.,,Circle.\n"
        "\"Two\nlines\",,Yes.\n"  # a quoted newline: one record over lines 4-5
        "Name a fruit.,,Apple, or pear.\n"  # an unquoted comma in a later row: pandas failed the whole run
        "Too few.,\n"
        "Name a tree.,,Oak.\n",
        encoding="utf-8",
    )
    result = load_sources([SourceSpec(str(path))])
    assert list(result.rows["prompt"]) == ["Name a shape.", "Two\nlines", "Name a tree."]
    assert list(result.rows["response"]) == ["Circle.", "Yes.", "Oak."]
    assert list(result.rows["source_index"]) == [1, 2, 5]
    rejected = result.rejected
    assert list(zip(rejected["source_index"], rejected["reason"])) == [(0, "csv_field_count"), (3, "csv_field_count"), (4, "csv_field_count")]
    assert list(rejected["detail"]) == [
        "line 2: 4 fields, the header has 3 (an unquoted comma or quote?)",
        "line 6: 4 fields, the header has 3 (an unquoted comma or quote?)",
        "line 7: 2 fields, the header has 3 (an unquoted comma or quote?)",
    ]
    assert list(rejected["raw"]) == ["Name a color, please.,,Blue.\n", "Name a fruit.,,Apple, or pear.\n", "Too few.,\n"]
    assert set(rejected["source_file"]) == {str(path)}
    assert len(result.rows) + len(rejected) == result.records_per_source["ragged"] == 6


def test_empty_files_of_every_format_count_zero_records(tmp_path):
    names = ["a.jsonl", "b.json", "c.csv", "d.parquet", "e.csv.gz", "f.jsonl.gz", "g.json", "h.csv"]
    for name in names[:5]:
        (tmp_path / name).write_bytes(b"")
    with gzip.open(tmp_path / "f.jsonl.gz", "wb"):
        pass
    (tmp_path / "g.json").write_text(" \n")
    (tmp_path / "h.csv").write_text("instruction,input,output\n")  # a header and no rows
    result = load_sources([SourceSpec(str(tmp_path / name)) for name in names])
    assert result.rows.empty and result.rejected.empty
    assert result.records_per_source == dict.fromkeys("abcdefgh", 0)


def test_read_errors_name_the_file_and_the_line(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("instruction,output\nTea?,Yes.\nCaf\xe9?,Oui.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: line 3 is not UTF-8"):
        load_sources([SourceSpec(str(tmp_path / "latin1.csv"))])
    (tmp_path / "broken.json").write_text('[\n{"a": 1},\n{"b": }\n]')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON .* at line 3, column 7"):
        load_sources([SourceSpec(str(tmp_path / "broken.json"))])
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match="junk.parquet"):
        load_sources([SourceSpec(str(tmp_path / "junk.parquet"))])
    (tmp_path / "twice.csv").write_text("prompt,prompt,completion\na,b,c\n")
    with pytest.raises(ValueError, match=r"twice.csv: .*'prompt' twice"):
        load_sources([SourceSpec(str(tmp_path / "twice.csv"))])


def test_csv_stray_and_unclosed_quotes_are_rejected_with_their_lines(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_text('prompt,completion\n"Hi" there,Hello.\nOk?,Ok.\n"never closed,x\nLost?,No.\n', encoding="utf-8")
    result = load_sources([SourceSpec(str(path))])
    assert list(result.rows["prompt"]) == ["Ok?"]
    assert list(zip(result.rejected["source_index"], result.rejected["reason"])) == [(0, "csv_malformed"), (2, "csv_malformed")]
    assert result.rejected.iloc[0]["detail"].startswith("line 2: not valid CSV")
    # The unclosed quote runs to the end of the file: those lines are one rejected record, not a merged row.
    assert result.rejected.iloc[1]["detail"].startswith("lines 4-5: not valid CSV")
    assert result.rejected.iloc[1]["raw"] == '"never closed,x\nLost?,No.\n'
    assert len(result.rows) + len(result.rejected) == result.records_per_source["quotes"] == 3
