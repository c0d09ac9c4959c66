"""Reading the tokenization stage's train/validation Parquet as the datasets the trainer consumes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def load_tokenized_splits(dataset_dir: str | Path) -> dict[str, Any]:
    """Load train (and non-empty validation) Parquet as `datasets.Dataset`s with input_ids + labels.

    Rows whose labels are all -100 are dropped: they carry no loss and a batch made only of
    them would divide by zero supervised tokens.
    """
    from accelerate import PartialState
    from datasets import load_dataset

    dataset_dir = Path(dataset_dir)
    files = {"train": dataset_dir / "train.parquet", "validation": dataset_dir / "validation.parquet"}
    if not files["train"].is_file():
        raise FileNotFoundError(f"TrainingConfig.dataset_dir: {files['train']} does not exist")
    present = {k: str(p) for k, p in files.items() if p.is_file() and num_rows(p) > 0}
    if "train" not in present:
        raise ValueError(f"TrainingConfig.dataset_dir: {files['train']} has no rows")
    # Under `accelerate launch` the main process builds the datasets cache first; the others reuse it.
    with PartialState().main_process_first():
        return _prepare_splits(load_dataset("parquet", data_files=present), present, files)


def _prepare_splits(splits, present: dict[str, str], files: dict[str, Path]) -> dict[str, Any]:
    out = {}
    for name, ds in splits.items():
        missing = {"input_ids", "labels"} - set(ds.column_names)
        if missing:
            raise ValueError(f"{present[name]} lacks column(s) {sorted(missing)}")
        # Only what the model consumes; the collator rebuilds attention_mask / position_ids.
        ds = ds.select_columns(["input_ids", "labels"])
        bad = ds.filter(lambda r: len(r["input_ids"]) != len(r["labels"]))
        if len(bad):
            raise ValueError(f"{present[name]}: {len(bad)} row(s) where labels and input_ids differ in length")
        before = len(ds)
        ds = ds.filter(lambda r: any(x != -100 for x in r["labels"]))
        if len(ds) < before:
            logger.warning("%s: dropped %d row(s) with no supervised tokens", name, before - len(ds))
        out[name] = ds
    if len(out["train"]) == 0:
        raise ValueError(f"{files['train']}: no row has a supervised (non -100) label")
    if "validation" in out and len(out["validation"]) == 0:
        del out["validation"]
    return out
