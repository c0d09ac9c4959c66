"""Tests for sft_pipeline.tokenization.info: reading a dataset's splits back, empty ones included."""

from __future__ import annotations

import dataclasses

import pandas as pd

from sft_pipeline.tokenization.config import TokenizationConfig
from sft_pipeline.tokenization.dataset import build_sft_dataset
from sft_pipeline.tokenization.info import find_damage, load_sft_splits
from tests.unit.tokenization.samples import make_rows


def test_empty_splits_still_load(tiny_model_dir, tmp_path):
    info = build_sft_dataset(make_rows(5), tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(validation_fraction=0, test_fraction=0))
    assert info.splits == {"train": 5, "validation": 0, "test": 0}
    ds = load_sft_splits(info)
    assert len(ds["validation"]) == 0 and "labels" in ds["validation"].column_names
    assert "messages" in ds["test"].column_names
    assert len(pd.read_parquet(info.files["validation"])) == 0


def test_find_damage_compares_rows_with_the_recorded_digests(tiny_model_dir, tmp_path):
    info = build_sft_dataset(make_rows(20), tiny_model_dir, tmp_path / "ds", TokenizationConfig(packing=True))
    assert find_damage(info, full_hash_max_bytes=1 << 30) is None
    assert set(info.file_digests) == {"train.parquet", "validation.parquet", "test.parquet",
                                      "train.packed.parquet", "validation.packed.parquet"}
    # Rows that differ from the recorded digest of one file (what an edit keeping size and footer gives).
    other = dataclasses.replace(info, file_digests={**info.file_digests, "test.parquet": "0" * 64})
    assert "test.parquet differ" in find_damage(other, full_hash_max_bytes=1 << 30)
    assert find_damage(other, full_hash_max_bytes=0) is None  # above the limit: size, footer and rows counted only
    older = dataclasses.replace(info, file_digests={}, file_sizes={}, content_hash="1" * 64)  # an older info file
    assert "content_hash" in find_damage(older, full_hash_max_bytes=1 << 30)
    fewer = dataclasses.replace(info, splits={**info.splits, "train": info.splits["train"] - 1})
    assert "train.parquet holds" in find_damage(fewer, full_hash_max_bytes=0)
