"""What one asset hands to the next: small dataclasses (paths, counts, digests), and the folders they name.

Heavy data stays on disk. Every materialization writes into a fresh staging folder and publishes it
with one rename to a folder named by its content digest (`<asset>/<digest16>/`), which is never
rewritten afterwards: two overlapping runs cannot read each other's half-written files, a killed step
leaves only a staging folder that nobody references (removed by the next writer), and a published
folder whose files no longer match their recorded digest is found out by `verify()`.

The hand-off dataclasses that stages already had live with their stage (`BaseModelInfo`,
`SftDatasetInfo`, `TrainingResult`, `RegistrationInfo`); the ones for row tables and evaluations live here.
No Dagster here: the I/O manager in `sft_pipeline.defs.io_manager` stores these as JSON.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sft_pipeline import hashing

# File names of persisted outputs: the only place they are spelled.
ROWS_FILE = "rows.parquet"
UNREADABLE_FILE = "unreadable.parquet"
REJECTED_FILE = "rejected.parquet"
QUESTIONS_FILE = "questions.parquet"
FEWSHOT_FILE = "fewshot.parquet"
PREDICTIONS_FILE = "predictions.parquet"
GENERATIONS_FILE = "generations.parquet"
SUMMARY_FILE = "summary.json"

STAGING_PREFIX = ".tmp-"


class OutputCorrupted(RuntimeError):
    """A published output's files do not match the digest recorded when it was written."""


# ------------------------------------------------------------------------------------------
# Staging and publishing folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_staging(parent: Path) -> list[Path]:
    """Delete staging folders under `parent` whose writing process is gone (killed or crashed)."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.glob(f"{STAGING_PREFIX}*"):
        parts = path.name[len(STAGING_PREFIX):].split("-")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def staging_folder(parent: str | Path) -> Iterator[Path]:
    """A new empty folder `<parent>/.tmp-<pid>-<random>` to write an output into; removed on the way
    out unless it was published (renamed) in between. Abandoned staging folders are cleaned first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(parent)
    tmp = parent / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_files(folder: Path) -> None:
    """Flush every file of a staged folder to disk before it is published."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def publish(staged: Path, final: Path, digest: str, files: list[str]) -> Path:
    """Rename a staged folder to its final, immutable name.

    If `final` already exists it holds the same content (it is named by its digest): it is kept when its
    files still match `digest` and replaced when they do not (a damaged copy); `staged` is dropped.
    """
    fsync_files(staged)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        if folder_matches(final, digest, files):
            shutil.rmtree(staged, ignore_errors=True)
            return final
        # Move the damaged copy aside first: a rename is atomic, an rmtree is not.
        trash = final.parent / f"{STAGING_PREFIX}{os.getpid()}-damaged-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(staged, final)
    except OSError:
        # Another writer published the same content between our check and the rename.
        if final.is_dir() and folder_matches(final, digest, files):
            shutil.rmtree(staged, ignore_errors=True)
            return final
        raise
    _fsync_dir(final.parent)
    return final


def content_digest(folder: Path, files: list[str]) -> str:
    """Digest of the named files of an output folder: Parquet files by their rows (`parquet_digest`, so
    writer metadata that varies between runs does not change the identity), other files by their bytes."""
    return hashing.combine_digests({
        name: hashing.parquet_digest(folder / name) if name.endswith(".parquet") else hashing.file_digest(folder / name)
        for name in sorted(files)
    })


def folder_matches(folder: Path, digest: str, files: list[str]) -> bool:
    """Whether `folder` holds every named file and their digest is `digest`."""
    if not all((folder / name).is_file() for name in files):
        return False
    try:
        return content_digest(folder, files) == digest
    except Exception:  # an unreadable (truncated, overwritten) Parquet file: not a match
        return False


def write_output_folder(parent: str | Path, write: "callable[[Path], list[str]]") -> tuple[Path, str]:
    """Write an output with `write(staging_dir) -> file names`, then publish it as `<parent>/<digest16>`.

    Returns the published folder and the output's digest.
    """
    with staging_folder(parent) as tmp:
        files = write(tmp)
        digest = content_digest(tmp, files)
        final = publish(tmp, Path(parent) / hashing.short(digest), digest, files)
    return final, digest


# ------------------------------------------------------------------------------------------
# Hand-offs


@dataclass(frozen=True)
class OutputInfo:
    """Common shape of a hand-off: the published folder, the files in it, and their digest."""

    path: str
    digest: str
    files: tuple[str, ...]

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def verify(self) -> None:
        """Raise OutputCorrupted unless every file is there and matches the recorded digest."""
        folder = Path(self.path)
        missing = [name for name in self.files if not (folder / name).is_file()]
        if missing:
            raise OutputCorrupted(f"{folder}: missing {', '.join(missing)}; rematerialize the asset that wrote it")
        try:
            actual = content_digest(folder, list(self.files))
        except Exception as exc:  # a truncated Parquet file cannot even be read
            raise OutputCorrupted(f"{folder}: a file cannot be read ({exc}); rematerialize the asset that wrote it") from exc
        if actual != self.digest:
            raise OutputCorrupted(f"{folder}: files changed since they were written (digest {hashing.short(actual)}, "
                                  f"recorded {hashing.short(self.digest)}); rematerialize the asset that wrote it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "files" in values:
            values["files"] = tuple(values["files"])
        return cls(**values)


def read_table(info: OutputInfo, name: str):
    """One Parquet file of a hand-off, as a DataFrame (rows keep their list/struct columns)."""
    from sft_pipeline.schema import read_rows

    return read_rows(info.file(name))


@dataclass(frozen=True)
class RawInstructionsInfo(OutputInfo):
    """`raw_instructions`: the rows read (ROWS_FILE) and the records that could not be read (UNREADABLE_FILE)."""

    rows: int = 0
    unreadable: int = 0
    records_per_source: dict[str, int] = field(default_factory=dict)

    @property
    def records_read(self) -> int:
        return self.rows + self.unreadable


@dataclass(frozen=True)
class CleanInstructionsInfo(OutputInfo):
    """`clean_instructions`: the kept rows (ROWS_FILE)."""

    rows: int = 0
    records_in: int = 0


@dataclass(frozen=True)
class RejectedInstructionsInfo(OutputInfo):
    """`rejected_instructions`: every record that did not make it, with a reason (ROWS_FILE)."""

    rows: int = 0


@dataclass(frozen=True)
class SyntheticInstructionsInfo(OutputInfo):
    """`synthetic_instructions`: accepted rows (ROWS_FILE), rejected candidates (REJECTED_FILE)."""

    rows: int = 0
    rejected: int = 0
    generation_key: str = ""
    journal: str = ""


@dataclass(frozen=True)
class MmluBenchmarkInfo(OutputInfo):
    """`mmlu_benchmark`: the questions (QUESTIONS_FILE), their k-shot examples (FEWSHOT_FILE), and how
    they are prompted. `fingerprint` identifies what a score depends on (ids, answers, shots, format)."""

    questions: int = 0
    fingerprint: str = ""
    source: str = ""
    subjects: tuple[str, ...] = ()
    questions_per_subject: int = 0
    seed: int = 0
    num_fewshot: int = 0
    prompt_format: str = "plain"
    shot_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class BaseModelEvaluationInfo(OutputInfo):
    """`base_model_evaluation`: per-question predictions (PREDICTIONS_FILE) and the summary (SUMMARY_FILE)."""

    key: str = ""
    fingerprint: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    reused: bool = False


@dataclass(frozen=True)
class ModelEvaluationInfo(OutputInfo):
    """`model_evaluation`: tuned predictions, generations side by side, scores of both models, the gate."""

    tuned: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    @property
    def gate_passed(self) -> bool:
        return bool(self.gate.get("passed"))


def write_row_tables(parent: str | Path, tables: dict[str, Any]) -> tuple[Path, str]:
    """Write DataFrames of canonical rows as Parquet files `{file name: frame}` into a new immutable
    folder under `parent`; returns the folder and the digest of its files."""
    from sft_pipeline.schema import write_rows

    def write(tmp: Path) -> list[str]:
        for name, frame in tables.items():
            write_rows(frame, tmp / name)
        return list(tables)

    return write_output_folder(parent, write)
