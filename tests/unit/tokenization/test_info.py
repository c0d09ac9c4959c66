"""Tests for sft_pipeline.tokenization.info: reading a dataset's splits back, empty ones included."""

from __future__ import annotations

import pandas as pd

from sft_pipeline.tokenization.config import TokenizationConfig
from sft_pipeline.tokenization.dataset import build_sft_dataset
from sft_pipeline.tokenization.info import load_sft_splits
from tests.unit.tokenization.samples import make_rows


def test_empty_splits_still_load(tiny_model_dir, tmp_path):
    info = build_sft_dataset(make_rows(5), tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(validation_fraction=0, test_fraction=0))
    assert info.splits == {"train": 5, "validation": 0, "test": 0}
    ds = load_sft_splits(info)
    assert len(ds["validation"]) == 0 and "labels" in ds["validation"].column_names
    assert "messages" in ds["test"].column_names
    assert len(pd.read_parquet(info.files["validation"])) == 0
