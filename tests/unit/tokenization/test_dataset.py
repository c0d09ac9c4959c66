"""Tests for sft_pipeline.tokenization.dataset: building the folder (splits, length policy, drops) and reuse."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_pipeline.schema import make_row
from sft_pipeline.tokenization import dataset
from sft_pipeline.tokenization.config import IGNORE_INDEX, TokenizationConfig
from sft_pipeline.tokenization.dataset import build_sft_dataset, materialize_sft_dataset
from sft_pipeline.tokenization.fingerprint import fingerprint
from sft_pipeline.tokenization.info import SftDatasetInfo, load_sft_splits, read_sft_dataset_info
from sft_pipeline.tokenization.write import assign_split
from tests.unit.tokenization.samples import make_rows


def test_build_writes_loadable_parquet(tiny_model_dir, tmp_path):
    rows = make_rows(60)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(max_length=256))
    assert isinstance(info, SftDatasetInfo)
    assert sum(info.splits.values()) == 60 and info.splits["train"] > 0
    assert info.dropped == 0 and info.truncated == 0 and info.template_name == "tokenizer"
    assert 0 < info.trainable_tokens < info.num_tokens
    assert sum(info.length_histogram.values()) == 60
    assert read_sft_dataset_info(tmp_path / "ds") == info
    json.dumps(info.to_dict())

    from datasets import load_dataset

    # train and validation share columns and load together; test has `messages` too, so alone.
    ds = load_dataset("parquet", data_files={s: info.files[s] for s in ("train", "validation")})
    ds["test"] = load_dataset("parquet", data_files=info.files["test"], split="train")
    assert {name: len(ds[name]) for name in ds} == info.splits
    train = ds["train"]
    assert set(train.column_names) == {"id", "input_ids", "attention_mask", "labels", "length"}
    assert set(ds["test"].column_names) == set(train.column_names) | {"messages"}
    assert {n: len(d) for n, d in load_sft_splits(tmp_path / "ds").items()} == info.splits
    ex = train[0]
    assert ex["length"] == len(ex["input_ids"]) == len(ex["labels"])
    assert IGNORE_INDEX in ex["labels"] and any(x != IGNORE_INDEX for x in ex["labels"])
    assert set(rows["id"]) == set(ds["train"]["id"]) | set(ds["validation"]["id"]) | set(ds["test"]["id"])
    # Each row lands in the split its id says.
    for name in ds:
        assert all(assign_split(i, 0.1, 0.1) == name for i in ds[name]["id"])


def test_test_split_keeps_messages(tiny_model_dir, tmp_path):
    rows = make_rows(40)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(test_fraction=0.5))
    test = pd.read_parquet(info.files["test"])
    assert len(test) > 0
    by_id = dict(zip(rows["id"], rows["messages"]))
    first = test.iloc[0]
    assert [dict(m) for m in first["messages"]] == by_id[first["id"]]


def test_max_length_drop_vs_truncate(tiny_model_dir, tmp_path):
    rows = make_rows(30, long_every=3)  # 10 long rows
    dropped = build_sft_dataset(rows, tiny_model_dir, tmp_path / "drop", TokenizationConfig(max_length=64))
    assert dropped.dropped == 10 and dropped.truncated == 0
    assert sum(dropped.splits.values()) == 20

    cut = build_sft_dataset(rows, tiny_model_dir, tmp_path / "cut",
                            TokenizationConfig(max_length=64, truncation="truncate"))
    assert cut.dropped == 0 and cut.truncated == 10
    assert sum(cut.splits.values()) == 30
    lengths = pd.concat(pd.read_parquet(f) for f in cut.files.values())["length"]
    assert lengths.max() == 64


def test_truncated_rows_without_labels_are_dropped(tiny_model_dir, tmp_path):
    long_prompt = " ".join(["The sea is wide and grey and calm."] * 40)
    rows = pd.DataFrame([make_row([{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Yes."}],
                                  source="unit")] + make_rows(5).to_dict("records"))
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(max_length=64, truncation="truncate", validation_fraction=0,
                                                test_fraction=0))
    assert info.dropped == 1 and info.splits["train"] == 5


def test_empty_train_raises(tiny_model_dir, tmp_path):
    rows = make_rows(3, long_every=1)  # every row too long
    with pytest.raises(ValueError, match="train split would be empty"):
        build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(max_length=32))
    assert not (tmp_path / "ds").exists()


def test_rebuild_replaces_output(tiny_model_dir, tmp_path):
    out = tmp_path / "ds"
    build_sft_dataset(make_rows(20), tiny_model_dir, out, TokenizationConfig())
    info = build_sft_dataset(make_rows(10), tiny_model_dir, out, TokenizationConfig())
    assert sum(info.splits.values()) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_control_token_in_content(tiny_model_dir, tmp_path):
    rows = make_rows(10)
    bad = make_row([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure<|im_end|> more"}], source="unit")
    rows = pd.concat([rows, pd.DataFrame([bad])], ignore_index=True)
    with pytest.raises(ValueError, match=f"row {bad['id']}.*<\\|im_end\\|>"):
        build_sft_dataset(rows, tiny_model_dir, tmp_path / "a", TokenizationConfig())
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "b", TokenizationConfig(control_tokens_in_content="drop"))
    assert info.dropped_reasons == {"control_token_in_content": 1} and sum(info.splits.values()) == 10
    dropped = pd.read_parquet(tmp_path / "b" / "dropped.parquet")
    assert list(dropped["id"]) == [bad["id"]] and "<|im_end|>" in dropped["detail"][0]


def test_duplicate_ids_are_kept_once_and_reported(tiny_model_dir, tmp_path):
    rows = make_rows(10)
    rows = pd.concat([rows, rows.iloc[:2]], ignore_index=True)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig())
    assert sum(info.splits.values()) == 10 and info.dropped_reasons == {"duplicate_id": 2} and info.rows_in == 12


def test_malformed_row_names_its_id(tiny_model_dir, tmp_path):
    rows = make_rows(3)
    rows.at[1, "messages"] = [{"role": "robot", "content": "x"}]
    with pytest.raises(ValueError, match=f"row {rows['id'][1]}.*robot"):
        build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig())



# --- reuse ----------------------------------------------------------------------------------------


def test_unchanged_inputs_are_not_tokenized_again(tiny_model_dir, tmp_path, monkeypatch):
    rows = make_rows(20)
    first = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig())
    assert first.reused is False and first.path == str(tmp_path / first.fingerprint) and len(first.content_hash) == 64

    def no_build(*args, **kwargs):
        raise AssertionError("unchanged inputs must not be tokenized again")

    monkeypatch.setattr(dataset, "build_sft_dataset", no_build)
    again = materialize_sft_dataset(rows.iloc[::-1], tiny_model_dir, tmp_path, TokenizationConfig(num_workers=2))
    assert again.reused is True and again.content_hash == first.content_hash and again.splits == first.splits
    monkeypatch.undo()

    edited = rows.copy()  # same id, different text: a stale cache would hide this
    edited.at[0, "messages"] = [{"role": "user", "content": "Changed?"}, {"role": "assistant", "content": "Yes."}]
    assert fingerprint(edited, tiny_model_dir) != fingerprint(rows, tiny_model_dir)
    for cfg in (TokenizationConfig(max_length=512), TokenizationConfig(template="chatml"),
                TokenizationConfig(system_prompt="Be brief."), TokenizationConfig(packing=True)):
        assert fingerprint(rows, tiny_model_dir, cfg) != first.fingerprint
    assert fingerprint(rows, tiny_model_dir, TokenizationConfig(batch_size=7)) == first.fingerprint


def test_workers_and_batches_do_not_change_the_output(tiny_model_dir, tmp_path):
    rows = make_rows(40, long_every=7)
    cfg = dict(max_length=64, truncation="truncate")
    one = build_sft_dataset(rows, tiny_model_dir, tmp_path / "one", TokenizationConfig(**cfg))
    many = build_sft_dataset(rows, tiny_model_dir, tmp_path / "many", TokenizationConfig(num_workers=2, batch_size=9, **cfg))
    assert one.content_hash == many.content_hash and one.splits == many.splits and one.truncated == many.truncated
