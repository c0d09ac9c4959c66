"""Personal data (email addresses, phone numbers): find and redact."""

from __future__ import annotations

import re
from typing import Any, Iterable

import pandas as pd

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Phone numbers written with separators: +44 20 7946 0958, (555) 123-4567, 555.123.4567.
# A match needs at least 10 digits (8 after a leading +), so dates, versions and IPs are not phones.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?|\d{2,4}[\s.-])(?:\d{2,4}[\s.-])?\d{3,4}[\s.-]\d{3,4}(?!\w|[.-]\d)")


def _phone_digits_ok(match: re.Match) -> bool:
    digits = sum(c.isdigit() for c in match.group(0))
    return digits >= (8 if match.group(0).startswith("+") else 10)


def find_pii(text: str) -> dict[str, int]:
    """How many email addresses and phone numbers `text` holds."""
    found = {"email": len(EMAIL.findall(text)), "phone": sum(_phone_digits_ok(m) for m in PHONE.finditer(text))}
    return {k: v for k, v in found.items() if v}


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
    """`text` with email addresses replaced by `[EMAIL]` and phone numbers by `[PHONE]`, and the counts."""
    counts = {"email": 0, "phone": 0}

    def email(_: re.Match) -> str:
        counts["email"] += 1
        return "[EMAIL]"

    def phone(match: re.Match) -> str:
        if not _phone_digits_ok(match):
            return match.group(0)
        counts["phone"] += 1
        return "[PHONE]"

    if "@" in text:
        text = EMAIL.sub(email, text)
    text = PHONE.sub(phone, text)
    return text, {k: v for k, v in counts.items() if v}


def redact_columns(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """A copy of `frame` with the text of `columns` (those it has) redacted; other values kept."""
    frame = frame.copy()
    for column in columns:
        if column in frame:
            frame[column] = [redact_pii(v)[0] if isinstance(v, str) else v for v in frame[column].tolist()]
    return frame


def redact_value(value: Any) -> Any:
    """`value` with every string inside it (lists, tuples and dict values, nested) redacted."""
    if isinstance(value, str):
        return redact_pii(value)[0]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value
