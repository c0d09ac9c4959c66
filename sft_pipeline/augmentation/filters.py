"""Self-Instruct's candidate filters (order and reason codes), but novelty: blacklist, benchmark overlap, responses."""

from __future__ import annotations

import re
from typing import Iterable

from sft_pipeline.augmentation.novelty import NoveltyFilter
from sft_pipeline.augmentation.parsing import QUOTES, normalize
from sft_pipeline.augmentation.prompts import one_line
from sft_pipeline.text_metrics import ngram_index, rouge_tokens, word_ngrams

# Tasks a text-only model cannot do (Alpaca's list).
BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)
_BLACKLIST_RE = re.compile(
    r"\b(?:" + "|".join(r"\s+".join(map(re.escape, kw.split())) for kw in BLACKLIST) + r")\b",
    re.IGNORECASE,
)
REFUSAL_PREFIXES = (
    "i'm sorry", "i am sorry", "sorry,", "i apologize", "as an ai", "as a language model",
    "i cannot", "i can't", "i can not", "i'm unable", "i am unable", "i'm not able", "i am not able",
)
BENCHMARK_NGRAM = 13

# The filters in the order a candidate meets them, and the reason codes each one writes.
FILTERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parse", ("empty_instruction",)),
    ("length", ("too_short", "too_long")),
    ("blacklist", ("blacklisted_keyword",)),
    ("duplicate", ("exact_duplicate",)),
    ("benchmark_overlap", ("benchmark_overlap",)),
    ("rouge_l_novelty", ("too_similar",)),
    ("instance_format", ("malformed_instance",)),
    ("response", ("empty_response", "non_answer")),
    ("instance_benchmark_overlap", ("instance_benchmark_overlap",)),
)
REASONS = tuple(r for _, reasons in FILTERS for r in reasons)


def blacklisted_keyword(text: str) -> str | None:
    """The first blacklisted keyword in `text` (whole words; "go to" as a phrase), else None."""
    m = _BLACKLIST_RE.search(text)
    return " ".join(m.group(0).lower().split()) if m else None


class BenchmarkOverlap:
    """Flags text that shares a 13-word n-gram with a benchmark question or is near-identical to one."""

    def __init__(self, questions: Iterable[str] = (), n: int = BENCHMARK_NGRAM, rouge_threshold: float = 0.7) -> None:
        self.n = n
        self._questions = [str(q) for q in questions if str(q).strip()]
        self._ngrams: dict[tuple[str, ...], int] = ngram_index(enumerate(self._questions), n, tokens=rouge_tokens)
        self._near = NoveltyFilter(self._questions, threshold=rouge_threshold)

    def check(self, text: str, near: bool = True) -> str | None:
        """A human-readable reason if `text` overlaps a benchmark question, else None.

        `near=False` checks only the shared n-gram (for long texts such as a response, where a
        whole-text ROUGE-L against a short question says little).
        """
        if not self._questions:
            return None
        # Iterates the set of the text's n-grams, as before the move: which shared n-gram a reason names
        # is not pinned (`first_shared_ngram` would name the earliest one).
        for g in word_ngrams(rouge_tokens(text), self.n):
            if g in self._ngrams:
                q = self._questions[self._ngrams[g]]
                return f"shares the {self.n}-gram '{' '.join(g)}' with benchmark question '{one_line(q, 120)}'"
        if near:
            novel, score, match = self._near.check(text)
            if not novel:
                return f"ROUGE-L {score:.2f} > {self._near.threshold:.2f} vs benchmark question '{one_line(match or '', 120)}'"
        return None


def instruction_word_count(text: str) -> int:
    """Whitespace-separated words: the unit of the length filter."""
    return len(str(text).split())


def response_problem(instruction: str, response: str, min_chars: int) -> tuple[str, str] | None:
    """(reason, detail) if the response is empty or a non-answer, else None."""
    text = str(response).strip()
    if len(text) < max(min_chars, 1):
        return "empty_response", f"response has {len(text)} chars (< {max(min_chars, 1)})"
    norm = normalize(text)
    if norm == normalize(instruction):
        return "non_answer", "response repeats the instruction"
    lowered = norm.lstrip(QUOTES + " ")
    for prefix in REFUSAL_PREFIXES:
        if lowered.startswith(prefix):
            return "non_answer", f"response starts with a refusal ('{prefix}')"
    return None


__all__ = [
    "BLACKLIST", "REFUSAL_PREFIXES", "BENCHMARK_NGRAM", "FILTERS", "REASONS", "blacklisted_keyword", "BenchmarkOverlap",
    "instruction_word_count", "response_problem",
]
