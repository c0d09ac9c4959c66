"""Tests for sft_pipeline.tokenization.write: split assignment by id, the content hash taken while writing."""

from __future__ import annotations

import pandas as pd

from sft_pipeline.hashing import TableHasher, combine_digests, parquet_digest
from sft_pipeline.tokenization.config import TokenizationConfig
from sft_pipeline.tokenization.dataset import build_sft_dataset
from sft_pipeline.tokenization.write import assign_split
from tests.unit.tokenization.samples import make_rows


def test_split_is_deterministic_and_stable():
    ids = [f"row-{i}" for i in range(3000)]
    first = {i: assign_split(i, 0.1, 0.1) for i in ids}
    assert first == {i: assign_split(i, 0.1, 0.1) for i in ids}
    # Adding rows never moves an existing one: the split depends on the id alone.
    more = ids + [f"new-{i}" for i in range(500)]
    assert all(assign_split(i, 0.1, 0.1) == first[i] for i in more[:3000])
    counts = pd.Series(list(first.values())).value_counts(normalize=True)
    assert abs(counts["test"] - 0.1) < 0.03 and abs(counts["validation"] - 0.1) < 0.03
    assert {assign_split(i, 0.0, 0.0) for i in ids} == {"train"}


def test_content_hash_is_the_written_rows(tiny_model_dir, tmp_path):
    """The hash taken while writing equals the hash of the files read back; it ignores batching but
    not a changed value."""
    import pyarrow as pa

    info = build_sft_dataset(make_rows(30), tiny_model_dir, tmp_path / "ds", TokenizationConfig(packing=True))
    names = [f"{s}.parquet" for s in ("train", "validation", "test")] + ["train.packed.parquet", "validation.packed.parquet"]
    read_back = {name: parquet_digest(tmp_path / "ds" / name) for name in names}
    assert combine_digests(read_back) == info.content_hash
    assert info.template_verbatim is True  # the tiny tokenizer's ChatML template is proved verbatim

    table = pa.table({"id": ["a", "b", "c"], "ids": pa.array([[1, 2], [3], []], type=pa.list_(pa.int32()))})
    whole, pieces, changed = TableHasher(), TableHasher(), TableHasher()
    whole.update(table)
    pieces.update(table.slice(0, 1))
    pieces.update(table.slice(1))
    changed.update(pa.table({"id": ["a", "b", "c"], "ids": pa.array([[1], [2, 3], []], type=pa.list_(pa.int32()))}))
    assert whole.hexdigest() == pieces.hexdigest() != changed.hexdigest()
