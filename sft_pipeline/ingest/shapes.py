"""Input shapes (Alpaca, Dolly, ShareGPT, messages, prompt/completion): detect one and map a record to messages."""

from __future__ import annotations

from typing import Any

import pandas as pd

from sft_pipeline.schema import ROLES

SHAPES = ("auto", "alpaca", "dolly", "sharegpt", "messages", "prompt_completion")

# ShareGPT speaker names seen in the wild, mapped to canonical roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


class RecordError(ValueError):
    """A record that cannot be mapped; `reason` is the machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def detect_shape(record: dict[str, Any]) -> str:
    """The input shape of one record, from the keys it has."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    raise RecordError("unknown_shape", f"cannot tell the input shape from keys {sorted(record)[:12]}")


def _text(record: dict[str, Any], key: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and pd.isna(value)):
        if required:
            raise RecordError("missing_field", f"field {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field {key!r} should be text, got {type(value).__name__}")
    return value


def _user_with_context(instruction: str, context: str) -> str:
    return f"{instruction}\n\n{context}" if context.strip() else instruction


def _turns(value: Any, role_key: str, content_key: str, role_map: dict[str, str] | None) -> list[dict[str, str]]:
    if hasattr(value, "tolist"):  # numpy arrays out of Parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RecordError("wrong_type", "conversation should be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"turn {i} should be an object, got {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise RecordError("missing_field", f"turn {i} has no {role_key!r}")
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"turn {i} {content_key!r} should be text")
        mapped = (role_map or {r: r for r in ROLES}).get(role.strip().lower())
        if mapped is None:
            raise RecordError("unknown_role", f"turn {i} has unknown role {role!r}")
        turns.append({"role": mapped, "content": content})
    return turns


def to_messages(record: dict[str, Any], shape: str) -> list[dict[str, str]]:
    """The conversation of one record as `[{role, content}]` in the given shape."""
    if shape == "auto":
        shape = detect_shape(record)
    if shape == "alpaca":
        user = _user_with_context(_text(record, "instruction", required=True), _text(record, "input", required=False))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output", required=True)}]
    if shape == "dolly":
        user = _user_with_context(_text(record, "instruction", required=True), _text(record, "context", required=False))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "response", required=True)}]
    if shape == "prompt_completion":
        answer_key = "completion" if "completion" in record else "response"
        return [
            {"role": "user", "content": _text(record, "prompt", required=True)},
            {"role": "assistant", "content": _text(record, answer_key, required=True)},
        ]
    if shape == "sharegpt":
        if "conversations" not in record:
            raise RecordError("missing_field", "field 'conversations' is missing")
        return _turns(record["conversations"], "from", "value", SHAREGPT_ROLES)
    if shape == "messages":
        if "messages" not in record:
            raise RecordError("missing_field", "field 'messages' is missing")
        return _turns(record["messages"], "role", "content", None)
    raise ValueError(f"unknown shape {shape!r}")


def category(record: dict[str, Any]) -> str | None:
    """The record's `category` when it is non-empty text, else None."""
    value = record.get("category")
    return value if isinstance(value, str) and value.strip() else None


def rename_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply a source's column mapping (canonical name -> name in the source)."""
    if not columns:
        return record
    renamed = dict(record)
    for canonical, original in columns.items():
        if original in record:
            renamed[canonical] = record[original]
    return renamed
