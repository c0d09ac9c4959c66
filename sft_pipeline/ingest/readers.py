"""Readers per format (JSONL, JSON, CSV, Parquet, Hugging Face datasets) yielding records or unreadable items.

Text files may be gzip-compressed and may start with a byte-order mark: UTF-8 (BOM or not),
UTF-16 and UTF-32 with a BOM are read; anything else is an error naming the file and line.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator

import pandas as pd

from sft_pipeline.schema import RAW_TEXT_LIMIT

if TYPE_CHECKING:
    from sft_pipeline.ingest.sources import SourceSpec

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Parquet compresses inside the file and needs random access, so only text formats come gzipped.
GZIP_SUFFIXES = (".jsonl.gz", ".json.gz", ".csv.gz")
HF_PREFIX = "hf://"
# A record larger than this (characters of text, or bytes of a JSONL line) is rejected as
# `oversized_record` before it is parsed or mapped: no training example is a megabyte long.
DEFAULT_MAX_RECORD_CHARS = 1_000_000

# Each reader yields (position, record_or_None, raw_text, error_reason, error_detail).
Item = tuple[int, dict[str, Any] | None, Any, str | None, str | None]

_GZIP_MAGIC = b"\x1f\x8b"
# UTF-32 first: its little-endian BOM starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# Read errors a damaged gzip stream or disk raises while a file is being read.
_STREAM_ERRORS = (OSError, EOFError, zlib.error)


def file_format(path: Path) -> str | None:
    """The reader suffix of a supported file (`.jsonl` for `a.jsonl`, `a.JSONL` and `a.jsonl.gz`), else None."""
    name = path.name.lower()
    suffixes: tuple[str, ...] = FILE_SUFFIXES
    if name.endswith(".gz"):
        name, suffixes = name[: -len(".gz")], tuple(s[: -len(".gz")] for s in GZIP_SUFFIXES)
    return next((suffix for suffix in suffixes if name.endswith(suffix)), None)


def file_stem(path: Path) -> str:
    """The file name without its format and compression suffixes: `part-1` for `part-1.jsonl.gz`."""
    suffix = file_format(path)
    if suffix is None:
        return path.stem
    cut = len(suffix) + (len(".gz") if path.name.lower().endswith(".gz") else 0)
    return path.name[:-cut]


@contextmanager
def _open_bytes(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, gunzipped when they are gzip (by content, whatever the name says)."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        compressed = magic == _GZIP_MAGIC
        if not compressed and magic and path.name.lower().endswith(".gz"):
            raise ValueError(f"{path}: named .gz but not gzip-compressed; rename it without .gz")
        if not compressed:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped


def _encoding(path: Path, head: bytes) -> tuple[str, int]:
    """(codec, BOM length) from the first bytes; NUL bytes without a BOM are UTF-16/32 we cannot place."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec, len(bom)
    if b"\x00" in head[:4]:
        raise ValueError(
            f"{path}: not UTF-8: it starts with NUL bytes, like UTF-16 or UTF-32 without a byte-order mark; "
            "save it as UTF-8 (or UTF-16 with a BOM)"
        )
    return "utf-8", 0


def _head(path: Path) -> bytes:
    with _open_bytes(path) as stream:
        try:
            return stream.read(4)
        except _STREAM_ERRORS as err:
            raise ValueError(f"{path}: could not be read (a truncated or damaged file?): {err}") from err


def _decoded_lines(path: Path, stream: IO[bytes], codec: str) -> Iterator[str]:
    """Lines of a UTF-16/32 stream; a bad byte is an error naming its exact line (io.TextIOWrapper knows only the chunk)."""
    decoder = codecs.getincrementaldecoder(codec)()
    line_no, partial = 0, ""
    while True:
        chunk = stream.read(1 << 20)
        pending, _ = decoder.getstate()
        try:
            text = partial + decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            # err.start counts from the bytes the decoder held back from the last chunk.
            before = (pending + chunk)[: err.start].decode(codec, "replace")
            line = line_no + (partial + before).count("\n") + 1
            raise ValueError(f"{path}: line {line} is not valid {codec[:6].upper()} ({err.reason})") from err
        lines = text.split("\n")
        partial = lines.pop()
        for line in lines:
            line_no += 1
            yield line + "\n"
        if not chunk:
            if partial:
                yield partial
            return


def _utf8_lines(path: Path) -> Iterator[bytes]:
    """The file's lines (split at \\n, endings kept) as UTF-8 bytes: gunzipped, BOM dropped, UTF-16/32 re-encoded.

    UTF-8 lines are passed through undecoded, so that each reader decides what a bad byte costs.
    """
    codec, bom_length = _encoding(path, _head(path))
    line_no = 0
    with _open_bytes(path) as stream:
        try:
            stream.read(bom_length)
            if codec == "utf-8":
                for line_no, line in enumerate(stream, start=1):
                    yield line
                return
            for line_no, text in enumerate(_decoded_lines(path, stream, codec), start=1):
                yield text.encode("utf-8")
        except _STREAM_ERRORS as err:
            raise ValueError(f"{path}: could not be read after line {line_no} (a truncated or damaged file?): {err}") from err


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
    for line_no, raw_bytes in enumerate(_utf8_lines(path), start=1):
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
    """One item per element of a JSON list (or of a `data` / `examples` wrapper); an empty file has none."""
    raw = b"".join(_utf8_lines(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 ({err}); save the file as UTF-8") from err
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); for one record per line use .jsonl"
        ) from err
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


class _TextLines:
    """Decoded lines for csv.reader that remember which lines the current row used (for `raw` and line numbers)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lines = _utf8_lines(path)
        self.line_no = 0
        self._taken: list[str] = []

    def __iter__(self) -> _TextLines:
        return self

    def __next__(self) -> str:
        raw = next(self._lines)
        self.line_no += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{self._path}: line {self.line_no} is not UTF-8 ({err}); save the file as UTF-8") from err
        self._taken.append(line)
        return line

    def take(self) -> tuple[str, str]:
        """The text of the lines read since the last take, and where they are: `line 2` or `lines 4-5`."""
        first = self.line_no - len(self._taken) + 1
        text, self._taken = "".join(self._taken), []
        return text, (f"line {first}" if first >= self.line_no else f"lines {first}-{self.line_no}")


def read_csv(path: Path, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> Iterator[Item]:
    """One item per CSV row, every cell read as text; a row that does not fit the header is rejected with its line."""
    # The csv module caps a field at 131,072 characters; records are capped by max_record_chars instead.
    csv.field_size_limit(max(csv.field_size_limit(), max_record_chars + 1))
    lines = _TextLines(path)
    # strict: a stray quote is an error we can report, not a field that silently swallows the lines after it.
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    index = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if header is None:
                raise ValueError(f"{path}: {lines.take()[1]}: the header row is not valid CSV ({err})") from err
            raw, where = lines.take()
            yield index, None, raw, "csv_malformed", f"{where}: not valid CSV ({err}); a stray or unclosed quote?"
            index += 1
            continue
        raw, where = lines.take()
        if not fields:  # a blank line
            continue
        if header is None:
            header = fields
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise ValueError(f"{path}: the header names {', '.join(map(repr, repeated))} twice; rename the columns")
            continue
        if len(fields) != len(header):
            detail = f"{where}: {len(fields)} fields, the header has {len(header)} (an unquoted comma or quote?)"
            yield index, None, raw, "csv_field_count", detail
        else:
            # Empty CSV cells mean "absent" for optional fields like Alpaca `input`.
            record = {name: (value if value != "" else None) for name, value in zip(header, fields)}
            yield index, record, record, None, None
        index += 1


def read_parquet(path: Path) -> Iterator[Item]:
    """One item per Parquet row, types kept; an empty (0-byte) file has none."""
    if path.stat().st_size == 0:
        return
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError and more for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from err
    yield from _records_from_frame(frame)


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
