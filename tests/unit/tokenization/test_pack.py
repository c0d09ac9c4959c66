"""Tests for sft_pipeline.tokenization.pack: best-fit packing, packed files that keep examples apart."""

from __future__ import annotations

import pandas as pd
import pytest

from sft_pipeline.tokenization.config import IGNORE_INDEX, TokenizationConfig
from sft_pipeline.tokenization.dataset import build_sft_dataset
from sft_pipeline.tokenization.pack import pack_bins, packed_attention_mask
from tests.unit.tokenization.samples import make_rows


def test_pack_bins():
    lengths = [5, 5, 3, 7, 2, 8, 10]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens in bins of 10: the optimum
    with pytest.raises(ValueError, match="pack_length"):
        pack_bins([11], 10)


def test_packed_split_isolates_examples(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    rows = make_rows(30)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(packing=True, pack_length=128, validation_fraction=0, test_fraction=0))
    assert set(info.packed_files) == {"train", "validation"}
    packed = pd.read_parquet(info.packed_files["train"])
    plain = pd.read_parquet(info.files["train"]).set_index("id")
    assert info.packed_sequences["train"] == len(packed) < len(plain)
    assert (packed["length"] == 128).all() and all(len(x) == 128 for x in packed["input_ids"])
    assert sorted(i for ids in packed["example_ids"] for i in ids) == sorted(plain.index)
    # The unpacked files keep their schema.
    assert list(pd.read_parquet(info.files["train"]).columns) == ["id", "input_ids", "attention_mask", "labels", "length"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pack = packed.iloc[0]
    assert len(pack["example_ids"]) >= 2
    with torch.no_grad():
        # position_ids restart per example and the block-diagonal mask: examples do not see each other.
        mask = packed_attention_mask(pack["example_lengths"], 128)
        logits = model(input_ids=torch.tensor([list(pack["input_ids"])]), attention_mask=mask,
                       position_ids=torch.tensor([list(pack["position_ids"])])).logits[0]
        start = 0
        for row_id, n in zip(pack["example_ids"], pack["example_lengths"]):
            row = plain.loc[row_id]
            assert list(pack["input_ids"][start:start + n]) == list(row["input_ids"])
            assert list(pack["position_ids"][start:start + n]) == list(range(n))
            assert pack["labels"][start] == IGNORE_INDEX
            assert list(pack["labels"][start + 1:start + n]) == list(row["labels"][1:])
            alone = model(input_ids=torch.tensor([list(row["input_ids"])])).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n
        assert set(pack["attention_mask"][start:]) <= {0} and set(pack["labels"][start:]) <= {IGNORE_INDEX}
    assert 0 < info.packing_efficiency <= 1
