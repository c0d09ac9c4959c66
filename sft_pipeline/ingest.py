"""Read instruction data from files and datasets and map every record to the canonical row.

Input shapes: Alpaca (`instruction`, `input`, `output`), Dolly (`instruction`, `context`,
`response`), ShareGPT (`conversations` of `{from, value}`), OpenAI-style `messages`, and
`prompt`/`completion`. Every record ends up either as a row or as a rejected row with a reason.
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from sft_pipeline.schema import RAW_TEXT_LIMIT, REJECT_COLUMNS, ROLES, ROW_COLUMNS, make_reject, make_row

log = logging.getLogger(__name__)

SHAPES = ("auto", "alpaca", "dolly", "sharegpt", "messages", "prompt_completion")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HF_PREFIX = "hf://"
PACKAGE_DATA = Path(__file__).parent / "data"
DEFAULT_SEED_FILES = ("seed_alpaca.jsonl", "seed_sharegpt.jsonl")
# A record larger than this (characters of text, or bytes of a JSONL line) is rejected as
# `oversized_record` before it is parsed or mapped: no training example is a megabyte long.
DEFAULT_MAX_RECORD_CHARS = 1_000_000

# ShareGPT speaker names seen in the wild, mapped to canonical roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


@dataclass
class SourceSpec:
    """One input source: a file, a glob, a `save_to_disk` folder, or `hf://org/name`."""

    path: str
    shape: str = "auto"
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> column in this source

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"source {self.path!r}: shape must be one of {SHAPES}, got {self.shape!r}")


@dataclass
class IngestResult:
    """Rows in the canonical schema, rejected records, and counts per source."""

    rows: pd.DataFrame
    rejected: pd.DataFrame
    records_per_source: dict[str, int]


class RecordError(ValueError):
    """A record that cannot be mapped; `reason` is the machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def default_sources() -> list[SourceSpec]:
    """The seed instruction set shipped in the package (two input shapes)."""
    return [SourceSpec(path=str(PACKAGE_DATA / name)) for name in DEFAULT_SEED_FILES]


# ---------------------------------------------------------------- shape mapping


def detect_shape(record: dict[str, Any]) -> str:
    """The input shape of one record, from the keys it has."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    raise RecordError("unknown_shape", f"cannot tell the input shape from keys {sorted(record)[:12]}")


def _text(record: dict[str, Any], key: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and pd.isna(value)):
        if required:
            raise RecordError("missing_field", f"field {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field {key!r} should be text, got {type(value).__name__}")
    return value


def _user_with_context(instruction: str, context: str) -> str:
    return f"{instruction}\n\n{context}" if context.strip() else instruction


def _turns(value: Any, role_key: str, content_key: str, role_map: dict[str, str] | None) -> list[dict[str, str]]:
    if hasattr(value, "tolist"):  # numpy arrays out of Parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RecordError("wrong_type", "conversation should be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"turn {i} should be an object, got {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise RecordError("missing_field", f"turn {i} has no {role_key!r}")
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"turn {i} {content_key!r} should be text")
        mapped = (role_map or {r: r for r in ROLES}).get(role.strip().lower())
        if mapped is None:
            raise RecordError("unknown_role", f"turn {i} has unknown role {role!r}")
        turns.append({"role": mapped, "content": content})
    return turns


def to_messages(record: dict[str, Any], shape: str) -> list[dict[str, str]]:
    """The conversation of one record as `[{role, content}]` in the given shape."""
    if shape == "auto":
        shape = detect_shape(record)
    if shape == "alpaca":
        user = _user_with_context(_text(record, "instruction", required=True), _text(record, "input", required=False))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output", required=True)}]
    if shape == "dolly":
        user = _user_with_context(_text(record, "instruction", required=True), _text(record, "context", required=False))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "response", required=True)}]
    if shape == "prompt_completion":
        answer_key = "completion" if "completion" in record else "response"
        return [
            {"role": "user", "content": _text(record, "prompt", required=True)},
            {"role": "assistant", "content": _text(record, answer_key, required=True)},
        ]
    if shape == "sharegpt":
        if "conversations" not in record:
            raise RecordError("missing_field", "field 'conversations' is missing")
        return _turns(record["conversations"], "from", "value", SHAREGPT_ROLES)
    if shape == "messages":
        if "messages" not in record:
            raise RecordError("missing_field", "field 'messages' is missing")
        return _turns(record["messages"], "role", "content", None)
    raise ValueError(f"unknown shape {shape!r}")


def _category(record: dict[str, Any]) -> str | None:
    value = record.get("category")
    return value if isinstance(value, str) and value.strip() else None


def _rename(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply a source's column mapping (canonical name -> name in the source)."""
    if not columns:
        return record
    renamed = dict(record)
    for canonical, original in columns.items():
        if original in record:
            renamed[canonical] = record[original]
    return renamed


# ---------------------------------------------------------------- readers

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


def _read_jsonl(path: Path, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> Iterator[Item]:
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


def _read_json(path: Path) -> Iterator[Item]:
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


def _read_csv(path: Path) -> Iterator[Item]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: file is not UTF-8 ({err})") from err
    # Empty CSV cells mean "absent" for optional fields like Alpaca `input`.
    frame = frame.replace({"": None})
    yield from _records_from_frame(frame)


def _read_parquet(path: Path) -> Iterator[Item]:
    yield from _records_from_frame(pd.read_parquet(path))


def _read_hf_dataset(spec: SourceSpec) -> Iterator[Item]:
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


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json"))


def expand_source(spec: SourceSpec) -> list[Path]:
    """The files a file or glob source names; raises FileNotFoundError naming what is missing."""
    if glob.has_magic(spec.path):
        matches = sorted(Path(p) for p in glob.glob(spec.path, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in FILE_SUFFIXES]
        if not files:
            raise FileNotFoundError(f"source glob {spec.path!r} matched no {'/'.join(FILE_SUFFIXES)} files")
        return files
    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"source file {spec.path!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"source folder {spec.path!r} holds no {'/'.join(FILE_SUFFIXES)} files")
        return files
    if path.suffix not in READERS:
        raise ValueError(f"source file {spec.path!r}: unsupported suffix {path.suffix!r}; use one of {FILE_SUFFIXES}")
    return [path]


def source_name(spec: SourceSpec) -> str:
    """The name rows from this source carry: the configured one, else the dataset or file stem."""
    if spec.name:
        return spec.name
    if spec.path.startswith(HF_PREFIX):
        return spec.path[len(HF_PREFIX):].rstrip("/").split("/")[-1]
    return Path(spec.path.split("*")[0]).stem or Path(spec.path).parent.name


def _iter_source(spec: SourceSpec, max_record_chars: int) -> Iterator[tuple[str, Item]]:
    if spec.path.startswith(HF_PREFIX) or _is_saved_dataset(Path(spec.path)):
        items: Iterator[Item] = _read_hf_dataset(spec)
        yield from ((spec.path, item) for item in _limit_size(items, max_record_chars))
        return
    for file in expand_source(spec):
        if file.suffix == ".jsonl":
            items = _read_jsonl(file, max_record_chars)
        else:
            items = _limit_size(READERS[file.suffix](file), max_record_chars)
        for item in items:
            yield str(file), item


def _limit_size(items: Iterator[Item], max_record_chars: int) -> Iterator[Item]:
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


def load_sources(specs: list[SourceSpec], max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> IngestResult:
    """Read every source; each record becomes a canonical row or a rejected row with a reason.

    A missing file, folder, glob or dataset raises an error naming it; an empty source gives
    no rows and counts 0 records. Records larger than `max_record_chars` are rejected unparsed.
    """
    if max_record_chars < 1:
        raise ValueError(f"max_record_chars must be >= 1, got {max_record_chars}")
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for spec in specs:
        name = source_name(spec)
        counts.setdefault(name, 0)
        for file, (position, record, raw, reason, detail) in _iter_source(spec, max_record_chars):
            counts[name] += 1
            where = {"source": name, "source_file": file, "source_index": position}
            if record is None:
                rejected.append(make_reject(stage="ingest", reason=reason, detail=detail, raw=raw, **where))
                continue
            try:
                record = _rename(record, spec.columns)
                messages = to_messages(record, spec.shape)
            except RecordError as err:
                rejected.append(make_reject(stage="ingest", reason=err.reason, detail=err.detail, raw=raw, **where))
                continue
            rows.append(make_row(messages, origin="human", category=_category(record), **where))
        log.info("source %s: %d records", name, counts[name])
    return IngestResult(rows=rows_frame(rows), rejected=rejects_frame(rejected), records_per_source=counts)


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame of canonical rows with every schema column present, even when empty."""
    frame = pd.DataFrame(rows)
    for column in ROW_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    return frame


def rejects_frame(rejects: list[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame of rejected rows with every reject column present, even when empty."""
    frame = pd.DataFrame(rejects, columns=list(REJECT_COLUMNS))
    frame["source_index"] = frame["source_index"].astype("Int64")
    return frame
