"""The canonical row schema every stage reads and writes (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

ROLES = ("system", "user", "assistant")
ORIGINS = ("human", "synthetic")
ROW_COLUMNS = (
    "id", "messages", "source", "origin", "category", "prompt", "response", "source_file", "source_index",
)
REJECT_COLUMNS = ("source", "source_file", "source_index", "stage", "reason", "detail", "raw", "id")
RAW_TEXT_LIMIT = 2000


def conversation_id(messages: Iterable[dict[str, str]]) -> str:
    """Stable content hash of a conversation: the same turns always give the same id."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def flatten_turns(messages: Iterable[dict[str, str]], role: str) -> str:
    """All turns of one role joined by a blank line (the flat `prompt` / `response` columns)."""
    return "\n\n".join(m["content"] for m in messages if m["role"] == role)


def make_row(
    messages: list[dict[str, str]],
    *,
    source: str,
    origin: str = "human",
    category: str | None = None,
    source_file: str | None = None,
    source_index: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A canonical row dict for one conversation; `extra` keys (provenance) are kept as columns."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    row = {
        "id": conversation_id(messages),
        "messages": messages,
        "source": source,
        "origin": origin,
        "category": category,
        "prompt": flatten_turns(messages, "user"),
        "response": flatten_turns(messages, "assistant"),
        "source_file": source_file,
        "source_index": source_index,
    }
    row.update(extra)
    return row


def make_reject(
    *,
    source: str | None,
    stage: str,
    reason: str,
    detail: str,
    raw: Any,
    source_file: str | None = None,
    source_index: int | None = None,
    id: str | None = None,
) -> dict[str, Any]:
    """A rejected-row dict: where it came from, a machine-readable reason, and the raw text (truncated)."""
    if not isinstance(raw, str):
        try:
            raw = json.dumps(raw, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            raw = repr(raw)
    return {
        "source": source,
        "source_file": source_file,
        "source_index": source_index,
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "raw": raw[:RAW_TEXT_LIMIT],
        "id": id,
    }


def write_rows(frame: "pd.DataFrame", path: "str | Path") -> "Path":
    """Write canonical or rejected rows to Parquet (creating the folder); returns the path."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def read_rows(path: "str | Path") -> "pd.DataFrame":
    """Read rows written by `write_rows`; `messages` come back as lists of plain dicts."""
    import pandas as pd

    frame = pd.read_parquet(path)
    if "messages" in frame.columns:
        frame["messages"] = [[{"role": m["role"], "content": m["content"]} for m in turns] for turns in frame["messages"]]
    return frame
