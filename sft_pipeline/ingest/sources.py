"""Sources: what a source names (file, glob, folder, saved dataset, hf://) and reading them all into rows and rejects."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from sft_pipeline.ingest.frames import rejects_frame, rows_frame
from sft_pipeline.ingest.readers import (
    DEFAULT_MAX_RECORD_CHARS,
    FILE_SUFFIXES,
    GZIP_SUFFIXES,
    HF_PREFIX,
    READERS,
    Item,
    file_format,
    file_stem,
    is_saved_dataset,
    limit_size,
    read_csv,
    read_hf_dataset,
    read_jsonl,
)
from sft_pipeline.ingest.shapes import SHAPES, RecordError, category, rename_columns, to_messages
from sft_pipeline.schema import make_reject, make_row

log = logging.getLogger(__name__)

PACKAGE_DATA = Path(__file__).parent.parent / "data"
# The embedded demo's data: general instructions in two input shapes, and the support-ticket triage task
# (a JSON answer) that fine-tuning measurably improves.
DEFAULT_SEED_FILES = ("seed_alpaca.jsonl", "seed_sharegpt.jsonl", "ticket_triage.jsonl")
_SUPPORTED = "/".join((*FILE_SUFFIXES, *GZIP_SUFFIXES))


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


def default_sources() -> list[SourceSpec]:
    """The seed instruction sets shipped in the package."""
    return [SourceSpec(path=str(PACKAGE_DATA / name)) for name in DEFAULT_SEED_FILES]


def expand_source(spec: SourceSpec) -> list[Path]:
    """The files a file or glob source names; raises FileNotFoundError naming what is missing."""
    if glob.has_magic(spec.path):
        matches = sorted(Path(p) for p in glob.glob(spec.path, recursive=True))
        files = [p for p in matches if p.is_file() and file_format(p)]
        if not files:
            raise FileNotFoundError(f"source glob {spec.path!r} matched no {_SUPPORTED} files")
        return files
    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"source file {spec.path!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p))
        if not files:
            raise FileNotFoundError(f"source folder {spec.path!r} holds no {_SUPPORTED} files")
        return files
    if file_format(path) is None:
        raise ValueError(f"source file {spec.path!r}: unsupported suffix {path.suffix!r}; use one of {_SUPPORTED}")
    return [path]


def source_name(spec: SourceSpec) -> str:
    """The name rows from this source carry: the configured one, else the dataset or file stem."""
    if spec.name:
        return spec.name
    if spec.path.startswith(HF_PREFIX):
        return spec.path[len(HF_PREFIX):].rstrip("/").split("/")[-1]
    return file_stem(Path(spec.path.split("*")[0])) or Path(spec.path).parent.name


def _iter_source(spec: SourceSpec, max_record_chars: int) -> Iterator[tuple[str, Item]]:
    if spec.path.startswith(HF_PREFIX) or is_saved_dataset(Path(spec.path)):
        items: Iterator[Item] = read_hf_dataset(spec)
        yield from ((spec.path, item) for item in limit_size(items, max_record_chars))
        return
    for file in expand_source(spec):
        suffix = file_format(file)
        if suffix == ".jsonl":
            items = read_jsonl(file, max_record_chars)
        elif suffix == ".csv":
            items = limit_size(read_csv(file, max_record_chars), max_record_chars)
        else:
            items = limit_size(READERS[suffix](file), max_record_chars)
        for item in items:
            yield str(file), item


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
                record = rename_columns(record, spec.columns)
                messages = to_messages(record, spec.shape)
            except RecordError as err:
                rejected.append(make_reject(stage="ingest", reason=err.reason, detail=err.detail, raw=raw, **where))
                continue
            rows.append(make_row(messages, origin="human", category=category(record), **where))
        log.info("source %s: %d records", name, counts[name])
    return IngestResult(rows=rows_frame(rows), rejected=rejects_frame(rejected), records_per_source=counts)
