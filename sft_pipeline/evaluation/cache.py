"""Identities and reuse of MMLU scores: the benchmark fingerprint, the base-evaluation key, and its reusable folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.hashing import json_digest, short

# Part of the reuse key of base_model_evaluation: bump when scores of the same model would change.
SCORING_VERSION = "2"
PREDICTIONS_FILE = "predictions.parquet"
# Written last: its presence marks a base-evaluation folder complete.
SUMMARY_FILE = "summary.json"


def benchmark_fingerprint(questions: pd.DataFrame, fewshot: pd.DataFrame | None, prompt_format: str) -> str:
    """16-hex hash of what defines an MMLU score: evaluated question ids and answers, the
    few-shot examples in prompt order, and the prompt format."""
    payload = {
        "questions": sorted(zip(map(str, questions["question_id"]), map(str, questions["answer"]))),
        "fewshot": ([] if fewshot is None or not len(fewshot) else
                    [(str(s), int(k), str(q)) for s, k, q in
                     sorted(zip(fewshot["subject"], fewshot["shot"], fewshot["question_id"]))]),
        "prompt_format": prompt_format,
    }
    return short(json_digest(payload))


def base_evaluation_key(base_revision: str, fingerprint: str) -> str:
    """Reuse key of base_model_evaluation: base model revision, question subset, shots, prompt format, scorer."""
    return short(json_digest([str(base_revision), fingerprint, SCORING_VERSION]))


def load_cached_base_evaluation(folder: str | Path) -> dict[str, Any] | None:
    """The record saved by `save_base_evaluation` in `folder`, or None when the folder is not complete."""
    folder = Path(folder)
    predictions_path, summary_path = folder / PREDICTIONS_FILE, folder / SUMMARY_FILE
    if not (predictions_path.is_file() and summary_path.is_file()):
        return None
    return json.loads(summary_path.read_text())


def save_base_evaluation(folder: str | Path, predictions: pd.DataFrame, record: dict[str, Any]) -> Path:
    """Write the predictions, then the record (`SUMMARY_FILE`, last), each under a temporary name
    renamed into place, so a killed run never leaves a folder that looks complete. Returns the
    predictions path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    predictions_path = folder / PREDICTIONS_FILE
    # ".tmp-" names are what hashing.folder_files skips.
    tmp = folder / f".tmp-{os.getpid()}-{PREDICTIONS_FILE}"
    predictions.to_parquet(tmp, index=False)
    tmp.replace(predictions_path)
    tmp = folder / f".tmp-{os.getpid()}-{SUMMARY_FILE}"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(folder / SUMMARY_FILE)
    return predictions_path


def evaluation_key(inputs: dict[str, Any]) -> str:
    """Reuse key of a tuned-model evaluation: the digests of everything it read and its settings."""
    return short(json_digest({**inputs, "scoring_version": SCORING_VERSION}))


def load_cached_evaluation(folder: str | Path, key: str) -> dict[str, Any] | None:
    """The evaluation record saved under `key`, or None when there is none."""
    path = Path(folder) / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_cached_evaluation(folder: str | Path, key: str, record: dict[str, Any]) -> Path:
    """Record an evaluation under its key, atomically (temporary name, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}-{key}.json"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(folder / f"{key}.json")
    return folder / f"{key}.json"
