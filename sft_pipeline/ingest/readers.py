"""Readers per format (JSONL, JSON, CSV, Parquet, Hugging Face datasets) yielding records or unreadable items."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd

from sft_pipeline.schema import RAW_TEXT_LIMIT

if TYPE_CHECKING:
    from sft_pipeline.ingest.sources import SourceSpec

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HF_PREFIX = "hf://"
# A record larger than this (characters of text, or bytes of a JSONL line) is rejected as
# `oversized_record` before it is parsed or mapped: no training example is a megabyte long.
DEFAULT_MAX_RECORD_CHARS = 1_000_000

# Each reader yields (position, record_or_None, raw_text, error_reason, error_detail).
Item = tuple[int, dict[str, Any] | None, Any, str | None, str | None]


def _record_chars(value: Any, limit: int) -> int:
    """Characters of text in a record (strings, keys, and nested lists/dicts), counted up to `limit`."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(k) for k in item if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "tolist"):
            stack.append(item.tolist())
        elif isinstance(item, bytes):
            total += len(item)
    return total


def read_jsonl(path: Path, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> Iterator[Item]:
    """One item per non-blank line; an oversized line is rejected before it is decoded or parsed."""
    with open(path, "rb") as handle:
        for line_no, raw_bytes in enumerate(handle, start=1):
            if len(raw_bytes) > max_record_chars:
                detail = f"line has {len(raw_bytes):,} bytes, more than max_record_chars={max_record_chars:,}; not parsed"
                yield line_no, None, raw_bytes[:RAW_TEXT_LIMIT].decode("utf-8", "replace"), "oversized_record", detail
                continue
            try:
                line = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, None, raw_bytes.decode("utf-8", "replace"), "undecodable_bytes", f"line is not UTF-8: {err}"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, None, line, "malformed_json", f"line does not parse as JSON: {err.msg} at column {err.colno}"
                continue
            if not isinstance(record, dict):
                yield line_no, None, line, "wrong_type", f"line is a JSON {type(record).__name__}, not an object"
                continue
            yield line_no, record, line, None, None


def read_json(path: Path) -> Iterator[Item]:
    """One item per element of a JSON list (or of a `data` / `examples` wrapper)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: file is not UTF-8 ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); for one record per line use .jsonl") from err
    if isinstance(data, dict):
        # A common wrapper: {"data": [...]} or a single record.
        data = data.get("data", data.get("examples", [data]))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        if isinstance(record, dict):
            yield index, record, record, None, None
        else:
            yield index, None, record, "wrong_type", f"record is a JSON {type(record).__name__}, not an object"


def _records_from_frame(frame: pd.DataFrame) -> Iterator[Item]:
    for index, record in enumerate(frame.to_dict(orient="records")):
        clean = {k: (None if _is_missing(v) else v) for k, v in record.items()}
        yield index, clean, clean, None, None


def _is_missing(value: Any) -> bool:
    return not isinstance(value, (list, dict)) and not hasattr(value, "tolist") and pd.isna(value)


def read_csv(path: Path) -> Iterator[Item]:
    """One item per CSV row, every cell read as text."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: file is not UTF-8 ({err})") from err
    # Empty CSV cells mean "absent" for optional fields like Alpaca `input`.
    frame = frame.replace({"": None})
    yield from _records_from_frame(frame)


def read_parquet(path: Path) -> Iterator[Item]:
    """One item per Parquet row, types kept."""
    yield from _records_from_frame(pd.read_parquet(path))


def read_hf_dataset(spec: SourceSpec) -> Iterator[Item]:
    """One item per example of `hf://<name>` (`datasets.load_dataset`) or of a `save_to_disk` folder."""
    import datasets

    if spec.path.startswith(HF_PREFIX):
        name = spec.path[len(HF_PREFIX):]
        try:
            dataset = datasets.load_dataset(name, split=spec.split, revision=spec.revision)
        except FileNotFoundError as err:  # DatasetNotFoundError is one
            raise FileNotFoundError(
                f"Hugging Face dataset {name!r} (split {spec.split!r}, revision {spec.revision or 'default'}) not found: {err}"
            ) from err
        except (ConnectionError, OSError) as err:
            raise FileNotFoundError(
                f"Hugging Face dataset {name!r} (split {spec.split!r}, revision {spec.revision or 'default'}) could not be reached "
                f"and is not in the local cache: {err}"
            ) from err
        except ValueError as err:  # an unknown split, among others
            raise ValueError(f"Hugging Face dataset {name!r}: {err}") from err
        except datasets.exceptions.DatasetGenerationError as err:
            raise ValueError(f"Hugging Face dataset {name!r} (split {spec.split!r}) could not be built: {err.__cause__ or err}") from err
    else:
        try:
            dataset = datasets.load_from_disk(spec.path)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"saved dataset folder {spec.path!r} could not be loaded: {err}") from err
        if isinstance(dataset, datasets.DatasetDict):
            if spec.split not in dataset:
                raise ValueError(f"{spec.path}: split {spec.split!r} not in {list(dataset)}")
            dataset = dataset[spec.split]
    for index, record in enumerate(dataset):
        yield index, record, record, None, None


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json"))


def limit_size(items: Iterator[Item], max_record_chars: int) -> Iterator[Item]:
    """Turn records with more than `max_record_chars` characters of text into `oversized_record` rejects."""
    for position, record, raw, reason, detail in items:
        if record is not None:
            size = _record_chars(record, max_record_chars)
            if size > max_record_chars:
                preview = {k: (v[:200] if isinstance(v, str) else v) for k, v in list(record.items())[:20]}
                detail = f"record has more than max_record_chars={max_record_chars:,} characters of text; not mapped"
                yield position, None, preview, "oversized_record", detail
                continue
        yield position, record, raw, reason, detail
