"""Ingested rows outside the raw_instructions suite's per-row bounds, set aside as ingest rejects.

The suite is a blocking check on the whole table: one 201-turn conversation would stop the run for
every record. Rows it would reject become rejected rows with a reason instead, and the suite stays
as the second line of defence. The bounds are read from the suite file, so editing the suite moves
the screen with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.curation.expectations import column_range
from sft_pipeline.ingest.frames import rejects_frame, rows_frame
from sft_pipeline.schema import make_reject

# conversation_view column -> (reason below the range, reason above it)
SCREENED_COLUMNS = {"num_turns": ("too_few_turns", "too_many_turns"), "conversation_chars": ("too_short", "too_long")}


def _measure(column: str, messages: list[dict[str, Any]]) -> int:
    if column == "num_turns":
        return len(messages)
    return sum(len(m["content"]) for m in messages)


def screen_rows(rows: pd.DataFrame, suite: str | Path, stage: str = "ingest") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows inside the suite's num_turns and conversation_chars ranges, rejected rows for the others)."""
    bounds = {column: column_range(suite, column) for column in SCREENED_COLUMNS}
    keep: list[int] = []
    rejected: list[dict[str, Any]] = []
    for position, (messages, where) in enumerate(zip(rows["messages"].tolist() if len(rows) else [],
                                                    rows[["source", "source_file", "source_index", "id"]].to_dict("records"))):
        problem = None
        for column, (low, high) in bounds.items():
            value = _measure(column, list(messages))
            unit = column.split("_")[-1]
            if high is not None and value > high:
                problem = SCREENED_COLUMNS[column][1], f"the conversation has {value} {unit}, more than {high} (the {Path(suite).name} bound on {column})"
            elif low is not None and value < low:
                problem = SCREENED_COLUMNS[column][0], f"the conversation has {value} {unit}, fewer than {low} (the {Path(suite).name} bound on {column})"
            if problem:
                break
        if problem is None:
            keep.append(position)
            continue
        source_index = where["source_index"]
        rejected.append(make_reject(stage=stage, reason=problem[0], detail=problem[1], raw=[dict(m) for m in messages], id=where["id"],
                                    source=where["source"], source_file=where["source_file"],
                                    source_index=None if pd.isna(source_index) else int(source_index)))
    if not rejected:
        return rows, rejects_frame([])
    return rows_frame(rows.iloc[keep].reset_index(drop=True)), rejects_frame(rejected)
