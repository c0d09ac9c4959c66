"""Immutable output folders: staging, publishing by digest, verification, abandoned staging clean-up."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from sft_pipeline import hashing
from sft_pipeline.outputs import (
    REJECTED_FILE,
    ROWS_FILE,
    STAGING_PREFIX,
    CleanInstructionsInfo,
    OutputCorrupted,
    content_digest,
    remove_abandoned_staging,
    staging_folder,
    write_output_folder,
    write_row_tables,
)
from sft_pipeline.schema import make_row


def rows(n: int, prefix: str = "q") -> pd.DataFrame:
    return pd.DataFrame([make_row([{"role": "user", "content": f"{prefix} {i}?"}, {"role": "assistant", "content": f"answer {i}."}],
                                  source="unit") for i in range(n)])


def test_same_rows_land_in_the_same_folder_and_other_rows_elsewhere(tmp_path):
    first, digest = write_row_tables(tmp_path / "clean", {ROWS_FILE: rows(5)})
    again, digest_again = write_row_tables(tmp_path / "clean", {ROWS_FILE: rows(5)})
    other, other_digest = write_row_tables(tmp_path / "clean", {ROWS_FILE: rows(6)})
    assert first == again and digest == digest_again
    assert other != first and other_digest != digest
    assert first.name == hashing.short(digest)
    # Parquet files are identified by their rows, so a file written again is the same output.
    assert digest == hashing.combine_digests({ROWS_FILE: hashing.parquet_digest(first / ROWS_FILE)})
    assert not list((tmp_path / "clean").glob(f"{STAGING_PREFIX}*"))


def test_verify_finds_a_changed_or_missing_file(tmp_path):
    folder, digest = write_row_tables(tmp_path / "clean", {ROWS_FILE: rows(5), REJECTED_FILE: rows(2, "r")})
    info = CleanInstructionsInfo(path=str(folder), digest=digest, files=(ROWS_FILE, REJECTED_FILE), rows=5)
    info.verify()
    rows(4).to_parquet(folder / ROWS_FILE)
    with pytest.raises(OutputCorrupted, match="files changed since they were written"):
        info.verify()
    (folder / ROWS_FILE).write_bytes((folder / ROWS_FILE).read_bytes()[:100])
    with pytest.raises(OutputCorrupted, match="cannot be read"):
        info.verify()
    (folder / REJECTED_FILE).unlink()
    with pytest.raises(OutputCorrupted, match=f"missing {REJECTED_FILE}"):
        info.verify()


def test_a_damaged_published_copy_is_replaced_when_the_same_content_is_written_again(tmp_path):
    folder, digest = write_row_tables(tmp_path / "clean", {ROWS_FILE: rows(5)})
    (folder / ROWS_FILE).write_bytes(b"truncated")
    again, digest_again = write_row_tables(tmp_path / "clean", {ROWS_FILE: rows(5)})
    assert again == folder and digest_again == digest
    assert content_digest(again, [ROWS_FILE]) == digest


def test_a_failed_write_leaves_no_staging_folder_and_publishes_nothing(tmp_path):
    def write(folder):
        (folder / "part.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_output_folder(tmp_path / "out", write)
    assert list((tmp_path / "out").iterdir()) == []


def test_staging_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    abandoned = tmp_path / f"{STAGING_PREFIX}{dead.stdout.strip()}-abc"
    abandoned.mkdir()
    (abandoned / ROWS_FILE).write_text("half")
    with staging_folder(tmp_path) as live:
        assert live.name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
        assert not abandoned.exists()
        assert remove_abandoned_staging(tmp_path) == []  # our own staging folder stays
        assert live.exists()
    assert not live.exists()
