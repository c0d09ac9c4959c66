"""DataFrames of canonical rows and rejected rows with every schema column present, even when empty."""

from __future__ import annotations

from typing import Any

import pandas as pd

from sft_pipeline.schema import REJECT_COLUMNS, ROW_COLUMNS


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
