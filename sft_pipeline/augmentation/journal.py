"""The resumable journal: one JSONL file per generation key, a header and then one line per finished round."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sft_pipeline.augmentation.config import SelfInstructConfig
from sft_pipeline.augmentation.prompts import PROMPT_VERSION
from sft_pipeline.augmentation.seeds import seed_pool
from sft_pipeline.hashing import json_digest, short

JOURNAL_VERSION = 1


class GenerationJournal:
    """An append-only JSONL file: a header line, then one line per finished round.

    A round line holds everything the round decided (rows, rejects, the instructions that joined the
    pool, counters), so replaying the lines rebuilds the loop's state exactly. Each line is flushed and
    fsynced as its round ends; a torn last line (a crash mid-write) is dropped on load.
    """

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = header

    def load(self) -> list[dict[str, Any]]:
        """Finished rounds recorded so far (empty for a new journal); rewrites a torn file to its valid prefix."""
        if not self.path.exists():
            return []
        good: list[str] = []
        rounds: list[dict[str, Any]] = []
        torn = False
        with self.path.open("r", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.endswith("\n"):
                    torn = True
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    torn = True
                    break
                if i == 0:
                    if record.get("kind") != "header" or record.get("key") != self.header["key"]:
                        raise ValueError(f"{self.path} belongs to another run (header {record!r})")
                elif record.get("kind") != "round" or record.get("round") != len(rounds):
                    torn = True
                    break
                else:
                    rounds.append(record)
                good.append(line)
        if torn:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(good), encoding="utf-8")
            tmp.replace(self.path)
        return rounds

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"kind": "header", **self.header}, sort_keys=True, default=str) + "\n")
            fh.write(json.dumps({"kind": "round", **record}, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def seed_data_version(seed_rows: pd.DataFrame) -> str:
    """Content hash of the seed pool (human seed ids and instructions, every pool instruction), order-free."""
    seeds, pool = seed_pool(seed_rows)
    return short(json_digest({"seeds": sorted(seeds), "pool": sorted(pool)}))


def generation_key(seed_version: str, teacher_id: str, cfg: SelfInstructConfig, benchmark_questions: Sequence[str]) -> dict[str, Any]:
    """What a run's generations depend on; equal keys mean a journal can be replayed."""
    parts = {
        "seed_data_version": seed_version,
        "teacher": teacher_id,
        "config_hash": short(json_digest(cfg.generation_fields())),
        "benchmark_hash": short(json_digest([str(q) for q in benchmark_questions])),
        "prompt_version": PROMPT_VERSION,
        "journal_version": JOURNAL_VERSION,
    }
    return {"key": short(json_digest(parts)), **parts}


__all__ = ["JOURNAL_VERSION", "GenerationJournal", "seed_data_version", "generation_key"]
