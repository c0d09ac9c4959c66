"""One home for content digests: files, folders, JSON values and tables.

Glossary (docs/ARCHITECTURE.md has the longer version):

* **digest**: sha256 hex of some content (bytes, a folder, a JSON value, a table). An output's digest
  is its identity: two outputs with the same digest hold the same content.
* **key**: the digest of everything that decides an output (inputs and settings), used to name a
  cached folder before the output exists (`sft_dataset/<key>/`, `fine_tuned_model/<key>/`).
* **data version**: what Dagster records for a materialization; always an output's digest.

Every function here returns the full 64-hex sha256; `short()` cuts it where a name must be short.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

CHUNK = 1 << 20
SHORT = 16


def short(digest: str, length: int = SHORT) -> str:
    """The first `length` hex characters of a digest: for folder names and run names."""
    return digest[:length]


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_digest(text: str) -> str:
    return bytes_digest(text.encode("utf-8"))


def json_digest(value: Any) -> str:
    """Digest of a JSON-able value in canonical form (sorted keys, no spaces; other types via str)."""
    return text_digest(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str))


def file_digest(path: str | Path) -> str:
    """Digest of one file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """Digest of several files: each file's name (relative to `root`, else its base name) and its
    digest, in sorted name order. The same files give the same digest wherever they are."""
    base = Path(root) if root is not None else None
    entries = []
    for path in map(Path, paths):
        name = path.relative_to(base).as_posix() if base is not None else path.name
        entries.append((name, path))
    digest = hashlib.sha256()
    for name, path in sorted(entries):
        digest.update(name.encode("utf-8") + b"\0" + file_digest(path).encode() + b"\n")
    return digest.hexdigest()


def folder_files(folder: str | Path, exclude: Iterable[str] = ()) -> list[Path]:
    """Every regular file under `folder` except the relative names in `exclude` and hidden temporaries."""
    root = Path(folder)
    skip = set(exclude)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in skip
                  and not any(part.startswith(".tmp-") for part in p.relative_to(root).parts))


def folder_digest(folder: str | Path, exclude: Iterable[str] = ()) -> str:
    """Digest of every file in a folder (relative names and bytes), `exclude` aside."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    return files_digest(folder_files(root, exclude), root=root)


def combine_digests(digests: dict[str, str]) -> str:
    """Digest of named parts, in the given order (a dataset of split files, an output of several files)."""
    digest = hashlib.sha256()
    for name, part in digests.items():
        digest.update(f"{name}\0{part}\0".encode())
    return digest.hexdigest()


class TableHasher:
    """Digest of a table's values as they are appended, batch by batch: the same rows give the same
    digest however they are cut into batches or row groups (each leaf column is its own stream)."""

    def __init__(self) -> None:
        self._streams: dict[str, Any] = {}

    def _update(self, key: str, data: bytes) -> None:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = hashlib.sha256()
        stream.update(data)

    def _add_array(self, key: str, array) -> None:
        import numpy as np
        import pyarrow as pa

        kind = array.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            self._add_array(f"{key}/lengths", array.value_lengths().fill_null(-1))
            self._add_array(f"{key}/values", array.flatten())
        elif pa.types.is_struct(kind):
            for child_field, child in zip(kind, array.flatten()):
                self._add_array(f"{key}.{child_field.name}", child)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            # Each value closed by NUL, so ["ab"] and ["a", "b"] differ; None is written as \x01\0.
            self._update(key, "".join("\x01\0" if v is None else v + "\0" for v in array.to_pylist())
                         .encode("utf-8", "surrogatepass"))
        elif pa.types.is_null(kind):
            self._update(key, f"null:{len(array)}\0".encode())
        else:
            values = array.to_numpy(zero_copy_only=False)
            if values.dtype == object:
                # Object arrays would hash pointers: hash the values' text (None as \x01) instead.
                self._update(key, "".join("\x01\0" if v is None else f"{v!r}\0" for v in array.to_pylist())
                             .encode("utf-8", "surrogatepass"))
            else:
                self._update(key, np.ascontiguousarray(values).tobytes())

    def update(self, table) -> None:
        """Add the rows of a pyarrow Table or RecordBatch (always the same schema for one hasher)."""
        for name, column in zip(table.column_names, table.columns):
            for chunk in getattr(column, "chunks", [column]):
                self._add_array(name, chunk)

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for key in sorted(self._streams):
            digest.update(key.encode() + b"\0" + self._streams[key].digest())
        return digest.hexdigest()


def parquet_digest(path: str | Path) -> str:
    """TableHasher digest of a Parquet file's rows (what a writer that hashed while writing reported)."""
    import pyarrow.parquet as pq

    hasher = TableHasher()
    for batch in pq.ParquetFile(path).iter_batches():
        hasher.update(batch)
    return hasher.hexdigest()


# PEFT writes a generated README (a template, not part of the model) next to an adapter.
MODEL_DIGEST_EXCLUDE = ("README.md",)


def model_digest(folder: str | Path) -> str:
    """The identity of a saved model or adapter folder: every file but the generated README.
    Training records it, the registry tags the version with it, exports verify against it."""
    return folder_digest(folder, exclude=MODEL_DIGEST_EXCLUDE)
