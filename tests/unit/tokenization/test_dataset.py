"""Tests for sft_pipeline.tokenization.dataset: building the folder (splits, length policy, drops) and reuse."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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
        assert all(assign_split(i, info.config["validation_fraction"], info.config["test_fraction"]) == name for i in ds[name]["id"])


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
# --- reuse verifies what it reuses (issue #14, item 3) ---------------------------------------------


def _content_hash_of(info: SftDatasetInfo) -> str:
    from sft_pipeline.hashing import combine_digests, parquet_digest

    files = {**{s: info.files[s] for s in ("train", "validation", "test")},
             **{f"{s}.packed": p for s, p in info.packed_files.items()}}
    return combine_digests({Path(p).name: parquet_digest(p) for p in files.values()})


def _flip_bytes_inside_a_data_page(path: Path) -> None:
    """Change bytes in the middle of the input_ids column chunk: size and footer stay as they were."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(0).column(1)
    at = column.data_page_offset + column.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    size = len(data)
    data[at:at + 4] = bytes(b ^ 0x5A for b in data[at:at + 4])
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


@pytest.mark.parametrize("damage, why", [
    (lambda f: os.truncate(f["train"], 1500), "train.parquet"),
    (lambda f: Path(f["validation"]).unlink(), "validation.parquet"),
    (lambda f: (Path(f["train"]).parent / "dropped.parquet").write_bytes(b""), "dropped.parquet"),
    (lambda f: _flip_bytes_inside_a_data_page(Path(f["train"])), "train.parquet"),
])
def test_damaged_dataset_is_rebuilt_not_reused(tiny_model_dir, tmp_path, caplog, damage, why):
    rows = make_rows(30)
    first = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig(packing=True))
    damage(first.files)
    with caplog.at_level(logging.WARNING, logger=dataset.__name__):
        again = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig(packing=True))
    assert again.reused is False and again.path == first.path
    assert again.content_hash == first.content_hash == _content_hash_of(again)
    assert again.splits == first.splits
    logged = [r.getMessage() for r in caplog.records if r.name == dataset.__name__]
    assert any("rebuild" in m and why in m for m in logged), logged
    # Rebuilt, the folder is sound again: reused as it is next time.
    assert materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig(packing=True)).reused is True


def test_full_hash_only_up_to_the_configured_size(tiny_model_dir, tmp_path, caplog):
    """Size and footer are always checked; the rows are hashed only when the files total at most
    reuse_full_hash_max_bytes: a change that keeps size and footer is found only by the hash."""
    rows = make_rows(30)
    first = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig())
    _flip_bytes_inside_a_data_page(Path(first.files["train"]))
    cheap = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig(reuse_full_hash_max_bytes=0))
    assert cheap.reused is True
    size = sum(Path(p).stat().st_size for p in first.files.values())
    exact = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig(reuse_full_hash_max_bytes=size))
    assert exact.reused is False and _content_hash_of(exact) == first.content_hash
    with pytest.raises(ValueError, match="reuse_full_hash_max_bytes"):
        TokenizationConfig(reuse_full_hash_max_bytes=-1)


def test_unreadable_info_file_is_rebuilt(tiny_model_dir, tmp_path):
    rows = make_rows(20)
    first = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig())
    info_file = Path(first.path) / "sft_dataset_info.json"
    info_file.write_text(info_file.read_text()[:40])
    again = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig())
    assert again.reused is False and again.content_hash == first.content_hash


def test_staging_follows_the_pid_pattern_and_abandoned_staging_is_removed(tiny_model_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    from sft_pipeline.outputs import STAGING_PREFIX

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f"{STAGING_PREFIX}{int(dead.stdout)}-0123456789ab"
    (abandoned / "sub").mkdir(parents=True)
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-ba9876543210"
    live.mkdir()
    seen = []
    real_fsync = dataset.fsync_files

    def spy(folder):
        seen.append(Path(folder).name)
        real_fsync(folder)

    monkeypatch.setattr(dataset, "fsync_files", spy)
    info = materialize_sft_dataset(make_rows(20), tiny_model_dir, tmp_path, TokenizationConfig())
    assert seen and all(name.startswith(f"{STAGING_PREFIX}{os.getpid()}-") for name in seen)
    assert not abandoned.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, Path(info.path).name])


def test_a_copy_published_meanwhile_by_another_process_is_kept(tiny_model_dir, tmp_path, monkeypatch):
    """Two processes building the same fingerprint: the second finds the first's complete, sound
    folder at publication time and keeps it instead of deleting it under its readers."""
    import shutil

    rows = make_rows(20)
    other = build_sft_dataset(rows, tiny_model_dir, tmp_path / "other", TokenizationConfig())
    out = tmp_path / "ds"
    real_fsync = dataset.fsync_files

    def publish_meanwhile(folder):
        real_fsync(folder)
        shutil.copytree(other.path, out)
        (out / "marker").write_text("the other process's copy")

    monkeypatch.setattr(dataset, "fsync_files", publish_meanwhile)
    info = build_sft_dataset(rows, tiny_model_dir, out, TokenizationConfig())
    assert (out / "marker").exists() and info.content_hash == other.content_hash and info.path == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "other"]


def test_a_different_copy_published_between_the_renames_fails_cleanly(tiny_model_dir, tmp_path, monkeypatch):
    """The old folder was moved aside; before our rename, another process publishes other content at
    the name. The rename fails and the stage says so, leaving their folder whole and no staging behind."""
    import shutil

    out = tmp_path / "ds"
    build_sft_dataset(make_rows(20), tiny_model_dir, out, TokenizationConfig())
    other = build_sft_dataset(make_rows(12), tiny_model_dir, tmp_path / "other", TokenizationConfig())
    real_rmtree = shutil.rmtree

    def rmtree_then_other_publishes(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if "-replaced-" in Path(path).name:
            shutil.copytree(other.path, out)

    monkeypatch.setattr(dataset.shutil, "rmtree", rmtree_then_other_publishes)
    with pytest.raises(RuntimeError, match="another process published"):
        build_sft_dataset(make_rows(10), tiny_model_dir, out, TokenizationConfig())
    monkeypatch.undo()
    assert read_sft_dataset_info(out).content_hash == other.content_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "other"]


# --- too many dropped rows (issue #14, item 4) -----------------------------------------------------


def _mostly_too_long() -> pd.DataFrame:
    long_rows = make_rows(20, long_every=1)
    short = make_rows(4)
    short["messages"] = [[{"role": "user", "content": f"Short {i}?"}, {"role": "assistant", "content": "Yes."}]
                         for i in range(4)]
    short["id"] = [f"short{i}" for i in range(4)]
    return pd.concat([long_rows, short], ignore_index=True)


def test_dropping_more_than_max_dropped_share_fails_naming_the_cause(tiny_model_dir, tmp_path):
    rows = _mostly_too_long()
    cfg = TokenizationConfig(max_length=64, validation_fraction=0, test_fraction=0)
    with pytest.raises(ValueError) as caught:
        materialize_sft_dataset(rows, tiny_model_dir, tmp_path, cfg)
    message = str(caught.value)
    assert "20 of 24" in message and "max_dropped_share=0.5" in message
    assert "too_long: 20" in message and "max_length=64" in message
    assert list(tmp_path.iterdir()) == []  # nothing published that a later run could reuse as good

    lenient = TokenizationConfig(max_length=64, validation_fraction=0, test_fraction=0, max_dropped_share=0.9)
    built = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, lenient)
    assert built.splits["train"] == 4 and built.dropped_reasons == {"too_long": 20}
    # The share is not part of the fingerprint, so the stricter setting meets the same folder: it fails too.
    with pytest.raises(ValueError, match="too_long: 20"):
        materialize_sft_dataset(rows, tiny_model_dir, tmp_path, cfg)
    with pytest.raises(ValueError, match="max_dropped_share"):
        TokenizationConfig(max_dropped_share=1.5)
