"""hashing: one digest per kind of artifact, independent of where and how it was written."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from sft_pipeline import hashing


def test_json_digest_is_canonical():
    assert hashing.json_digest({"b": 1, "a": [1, 2]}) == hashing.json_digest({"a": [1, 2], "b": 1})
    assert hashing.json_digest({"a": 1}) == hashlib.sha256(json.dumps({"a": 1}, separators=(",", ":")).encode()).hexdigest()
    assert hashing.short(hashing.json_digest([1])) == hashing.json_digest([1])[:16]


def test_folder_digest_depends_on_names_and_bytes_not_location(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "sub").mkdir(parents=True)
        (root / "x.bin").write_bytes(b"one")
        (root / "sub" / "y.bin").write_bytes(b"two")
    assert hashing.folder_digest(tmp_path / "a") == hashing.folder_digest(tmp_path / "b")
    (tmp_path / "b" / "sub" / "y.bin").write_bytes(b"TWO")
    assert hashing.folder_digest(tmp_path / "a") != hashing.folder_digest(tmp_path / "b")
    (tmp_path / "a" / "sub" / "y.bin").rename(tmp_path / "a" / "sub" / "z.bin")
    (tmp_path / "b" / "sub" / "y.bin").write_bytes(b"two")
    assert hashing.folder_digest(tmp_path / "a") != hashing.folder_digest(tmp_path / "b")


def test_model_digest_ignores_the_generated_readme_and_staging(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    before = hashing.model_digest(tmp_path)
    (tmp_path / "README.md").write_text("generated card")
    (tmp_path / ".tmp-1-x").mkdir()
    (tmp_path / ".tmp-1-x" / "half").write_bytes(b"?")
    assert hashing.model_digest(tmp_path) == before
    (tmp_path / "adapter_model.safetensors").write_bytes(b"other weights")
    assert hashing.model_digest(tmp_path) != before


def test_table_digest_is_independent_of_batching_and_row_groups(tmp_path):
    table = pa.table({"id": ["a", "b", "c"], "ids": [[1, 2], [3], []]})
    whole, pieces = hashing.TableHasher(), hashing.TableHasher()
    whole.update(table)
    for batch in table.to_batches(max_chunksize=1):
        pieces.update(batch)
    assert whole.hexdigest() == pieces.hexdigest()
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1)
    assert hashing.parquet_digest(tmp_path / "t.parquet") == whole.hexdigest()
    # Values are delimited: ["ab"] and ["a", "b"] are different tables.
    one, two = hashing.TableHasher(), hashing.TableHasher()
    one.update(pa.table({"s": ["ab"]}))
    two.update(pa.table({"s": ["a", "b"]}))
    assert one.hexdigest() != two.hexdigest()


def test_table_digest_of_null_and_mixed_columns_is_reproducible(tmp_path):
    # All-null columns (e.g. the id of an unreadable record) and nullable numbers must not hash object pointers.
    table = pa.table({"id": pa.array([None, None], type=pa.null()), "n": [1, None], "b": [True, None], "s": ["x", None]})
    pq.write_table(table, tmp_path / "t.parquet")
    digests = {hashing.parquet_digest(tmp_path / "t.parquet") for _ in range(5)}
    assert len(digests) == 1
    other = pa.table({"id": pa.array([None, None, None], type=pa.null()), "n": [1, None, 2], "b": [True, None, False], "s": ["x", None, "y"]})
    pq.write_table(other, tmp_path / "o.parquet")
    assert hashing.parquet_digest(tmp_path / "o.parquet") not in digests
