"""Row filters: conversation structure and length bounds, refusal and boilerplate phrases."""

from __future__ import annotations

import re
from typing import Iterable

from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.schema import ROLES


def conversation_problem(messages: list[dict[str, str]], cfg: CurationConfig) -> tuple[str, str] | None:
    """The first reason this conversation cannot be trained on, as (code, detail), or None."""
    if not messages:
        return "empty_conversation", "the conversation has no turns"
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            return "unknown_role", f"turn {i} has role {m['role']!r}"
        if not m["content"]:
            if m["role"] == "assistant":
                return "empty_response", f"assistant turn {i} is empty after normalization"
            return "empty_turn", f"{m['role']} turn {i} is empty after normalization"
    if any(m["role"] == "system" for m in messages[1:]):
        return "misplaced_system", "a system turn may only open the conversation"
    if not any(m["role"] == "user" for m in messages):
        return "no_user_turn", "the conversation has no user turn"
    # The clean_instructions suite requires (system,)? user, assistant, user, assistant, ...:
    # a row that breaks it here is quarantined instead of failing the blocking check for everyone.
    start = 1 if messages[0]["role"] == "system" else 0
    if messages[start]["role"] != "user":
        return "assistant_first", f"turn {start} is {messages[start]['role']!r}: the conversation must open with a user turn"
    for i in range(start + 1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"]:
            return "role_order", f"turns {i - 1} and {i} are both {messages[i]['role']!r}: user and assistant turns must alternate"
    if messages[-1]["role"] != "assistant":
        return "no_final_assistant", f"the last turn is {messages[-1]['role']!r}, not 'assistant'"
    if len(messages) > cfg.max_turns:
        return "too_many_turns", f"the conversation has {len(messages)} turns, more than {cfg.max_turns}"
    response_chars = sum(len(m["content"]) for m in messages if m["role"] == "assistant")
    if response_chars < cfg.min_response_chars:
        return "empty_response", f"assistant text has {response_chars} characters, fewer than {cfg.min_response_chars}"
    total = sum(len(m["content"]) for m in messages)
    if total > cfg.max_conversation_chars:
        return "too_long", f"the conversation has {total} characters, more than {cfg.max_conversation_chars}"
    if total < cfg.min_conversation_chars:
        return "too_short", f"the conversation has {total} characters, fewer than {cfg.min_conversation_chars}"
    return None


class PhraseFilter:
    """Case-insensitive patterns searched in one pass (all joined into one alternation), then
    the first matching pattern is named. A pattern list that cannot be joined (numbered
    back-references) is searched pattern by pattern."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]
        self.joined: re.Pattern | None = None
        if self.patterns:
            try:
                self.joined = re.compile("|".join(f"(?:{p.pattern})" for p in self.patterns), re.IGNORECASE)
            except re.error:
                self.joined = None

    def search(self, text: str) -> tuple[str, str] | None:
        """(matched text, pattern) of the first pattern found in `text`, or None."""
        if not self.patterns or (self.joined is not None and not self.joined.search(text)):
            return None
        for pattern in self.patterns:
            hit = pattern.search(text)
            if hit:
                return hit.group(0), pattern.pattern
        return None


def phrase_problem(messages: list[dict[str, str]], refusals: PhraseFilter, boilerplate: PhraseFilter) -> tuple[str, str] | None:
    """A refusal in an assistant turn or boilerplate in any turn, as (code, detail), or None."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            hit = refusals.search(m["content"])
            if hit:
                return "refusal", f"assistant turn {i} refuses: {hit[0]!r} matches refusal pattern {hit[1]!r}"
        hit = boilerplate.search(m["content"])
        if hit:
            return "boilerplate", f"{m['role']} turn {i} holds boilerplate {hit[0]!r} (pattern {hit[1]!r})"
    return None
