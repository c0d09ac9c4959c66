"""Clean canonical rows: normalize text, reject invalid or over-long conversations, remove exact
and near duplicates, and drop rows that leak benchmark questions.

`clean_instructions(rows, config, benchmark_texts)` returns `(kept, rejected)`; every input row
lands in exactly one of them, and every rejected row carries a machine-readable reason.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from sft_pipeline.ingest import rejects_frame, rows_frame
from sft_pipeline.schema import ROLES, make_reject, make_row

_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
# Control characters other than tab and newline carry no meaning in instruction text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_CODE_FENCE = re.compile(r"(```.*?```)", re.DOTALL)
# Markup left over from scraped HTML; removed outside code fences only, where a tag may be code.
# Block tags become line breaks, inline tags vanish.
_HTML_BLOCK_TAG = re.compile(r"</?(?:p|br|div|li|ul|ol|h[1-6]|table|tr)(?:\s[^<>]*)?/?>", re.IGNORECASE)
_HTML_INLINE_TAG = re.compile(r"</?(?:span|b|i|em|strong|u|font|td|th)(?:\s[^<>]*)?/?>", re.IGNORECASE)
# Runs of spaces after a non-space: collapsed. Leading indentation is left alone.
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class CurationConfig:
    """Settings for `clean_instructions`; the defaults suit instruction-tuning data."""

    min_response_chars: int = field(default=1, metadata={"help": "A conversation whose assistant turns hold fewer characters is rejected (`empty_response`)."})
    max_conversation_chars: int = field(default=12_000, metadata={"help": "A conversation longer than this, all turns together, is rejected (`too_long`)."})
    strip_html: bool = field(default=True, metadata={"help": "Remove HTML tags and unescape entities outside code fences."})
    near_dedup: bool = field(default=True, metadata={"help": "Remove near duplicates with MinHash LSH over word shingles of the whole conversation."})
    near_dedup_threshold: float = field(default=0.8, metadata={"help": "Estimated Jaccard similarity at or above which two conversations are near duplicates."})
    shingle_words: int = field(default=3, metadata={"help": "Words per shingle for near-duplicate detection."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations: more is more accurate and slower."})
    decontamination_ngram: int = field(default=13, metadata={"help": "A row sharing a run of this many words with a benchmark item is rejected; 0 turns it off."})
    seed: int = field(default=1, metadata={"help": "MinHash seed, so near-duplicate decisions are reproducible."})

    def __post_init__(self) -> None:
        if self.min_response_chars < 0:
            raise ValueError(f"min_response_chars must be >= 0, got {self.min_response_chars}")
        if self.max_conversation_chars <= 0:
            raise ValueError(f"max_conversation_chars must be > 0, got {self.max_conversation_chars}")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ValueError(f"near_dedup_threshold must be in (0, 1], got {self.near_dedup_threshold}")
        if self.shingle_words < 1:
            raise ValueError(f"shingle_words must be >= 1, got {self.shingle_words}")
        if self.num_perm < 16:
            raise ValueError(f"num_perm must be >= 16, got {self.num_perm}")
        if self.decontamination_ngram < 0:
            raise ValueError(f"decontamination_ngram must be >= 0, got {self.decontamination_ngram}")


@dataclass
class CurationReport:
    """What `clean_instructions` did: counts in, kept, and rejected per reason."""

    rows_in: int
    kept: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- normalization


def _outside_code_fences(text: str, transform) -> str:
    parts = _CODE_FENCE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code fences
        parts[i] = transform(parts[i])
    return "".join(parts)


def _strip_markup(text: str) -> str:
    return html.unescape(_HTML_INLINE_TAG.sub("", _HTML_BLOCK_TAG.sub("\n", text)))


def normalize_text(text: str, strip_html: bool = True) -> str:
    """NFKC, no zero-width or control characters, unix newlines, single inner spaces outside code,
    no trailing spaces, at most one blank line. Leading indentation is kept: it matters in code.
    """
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _ZERO_WIDTH.sub("", text))
    if strip_html:
        text = _outside_code_fences(text, _strip_markup)
    text = _outside_code_fences(text, lambda part: _INNER_SPACES.sub(" ", part))
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def dedup_key(messages: Iterable[dict[str, str]]) -> str:
    """Hash of the conversation with case and all whitespace folded: equal keys are exact duplicates."""
    folded = "\x1f".join(f"{m['role']}\x1e{' '.join(m['content'].casefold().split())}" for m in messages)
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()


def words(text: str) -> list[str]:
    """Lower-case word tokens, the unit of shingles and n-grams."""
    return _WORD.findall(text.casefold())


# ---------------------------------------------------------------- validity


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
    if messages[-1]["role"] != "assistant":
        return "no_final_assistant", f"the last turn is {messages[-1]['role']!r}, not 'assistant'"
    response_chars = sum(len(m["content"]) for m in messages if m["role"] == "assistant")
    if response_chars < cfg.min_response_chars:
        return "empty_response", f"assistant text has {response_chars} characters, fewer than {cfg.min_response_chars}"
    total = sum(len(m["content"]) for m in messages)
    if total > cfg.max_conversation_chars:
        return "too_long", f"the conversation has {total} characters, more than {cfg.max_conversation_chars}"
    return None


# ---------------------------------------------------------------- near duplicates and contamination


def _shingles(text: str, n: int) -> set[str]:
    tokens = words(text)
    if len(tokens) <= n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def find_near_duplicates(texts: list[str], cfg: CurationConfig) -> dict[int, int]:
    """Map index -> index of the earlier text it nearly duplicates (MinHash LSH, datasketch).

    Earlier texts win, so the survivor of a group is the first in input order.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.num_perm)
    duplicates: dict[int, int] = {}
    for i, text in enumerate(texts):
        shingles = _shingles(text, cfg.shingle_words)
        signature = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        signature.update_batch([s.encode("utf-8") for s in shingles])
        candidates = lsh.query(signature)
        if candidates:
            duplicates[i] = min(candidates)
            continue
        lsh.insert(i, signature)
    return duplicates


def benchmark_ngrams(texts: Iterable[tuple[str, str]], n: int) -> dict[tuple[str, ...], str]:
    """Every n-word run of the benchmark texts, mapped to the id of the item it came from."""
    index: dict[tuple[str, ...], str] = {}
    for item_id, text in texts:
        tokens = words(text)
        for i in range(len(tokens) - n + 1):
            index.setdefault(tuple(tokens[i : i + n]), item_id)
    return index


def contamination(text: str, index: dict[tuple[str, ...], str], n: int) -> tuple[str, str] | None:
    """The first (benchmark item id, shared n-gram) this text shares with the benchmark, or None."""
    tokens = words(text)
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in index:
            return index[gram], " ".join(gram)
    return None


# ---------------------------------------------------------------- the stage


def _where(row: dict[str, Any]) -> dict[str, Any]:
    return {"source": row.get("source"), "source_file": row.get("source_file"), "source_index": row.get("source_index")}


def clean_instructions(
    rows: pd.DataFrame,
    cfg: CurationConfig | None = None,
    benchmark_texts: Iterable[tuple[str, str]] = (),
) -> tuple[pd.DataFrame, pd.DataFrame, CurationReport]:
    """Normalize, validate, deduplicate and decontaminate canonical rows.

    `benchmark_texts` are (item id, text) pairs: a question with its choices. Returns
    (kept rows, rejected rows, report); kept + rejected == rows in.
    """
    cfg = cfg or CurationConfig()
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    index = benchmark_ngrams(benchmark_texts, cfg.decontamination_ngram) if cfg.decontamination_ngram else {}
    first_by_key: dict[str, str] = {}
    provenance = [c for c in rows.columns if c not in ("id", "messages", "prompt", "response", "source", "origin", "category")]

    for row in rows.to_dict(orient="records"):
        raw_messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        messages = [{"role": m["role"], "content": normalize_text(m["content"], cfg.strip_html)} for m in raw_messages]
        problem = conversation_problem(messages, cfg)
        if problem:
            rejected.append(make_reject(stage="curation", reason=problem[0], detail=problem[1], raw=raw_messages, id=row["id"], **_where(row)))
            continue
        clean = make_row(
            messages,
            source=row["source"],
            origin=row.get("origin") or "human",
            category=row.get("category"),
            **{k: row.get(k) for k in provenance},
        )
        if index:
            hit = contamination("\n".join(m["content"] for m in messages), index, cfg.decontamination_ngram)
            if hit:
                detail = f"shares the {cfg.decontamination_ngram}-gram {hit[1]!r} with benchmark item {hit[0]}"
                rejected.append(make_reject(stage="curation", reason="benchmark_contamination", detail=detail, raw=raw_messages, id=clean["id"], **_where(row)))
                continue
        key = dedup_key(messages)
        if key in first_by_key:
            detail = f"exact duplicate of {first_by_key[key]}"
            rejected.append(make_reject(stage="curation", reason="exact_duplicate", detail=detail, raw=raw_messages, id=clean["id"], **_where(row)))
            continue
        first_by_key[key] = clean["id"]
        kept.append(clean)

    if cfg.near_dedup and len(kept) > 1:
        texts = ["\n".join(f"{m['role']}: {m['content']}" for m in row["messages"]) for row in kept]
        near = find_near_duplicates(texts, cfg)
        survivors = []
        for i, row in enumerate(kept):
            if i in near:
                detail = f"near duplicate of {kept[near[i]]['id']} (MinHash Jaccard >= {cfg.near_dedup_threshold})"
                rejected.append(make_reject(stage="curation", reason="near_duplicate", detail=detail, raw=row["messages"], id=row["id"], **_where(row)))
            else:
                survivors.append(row)
        kept = survivors

    rejected_frame = rejects_frame(rejected)
    report = CurationReport(
        rows_in=len(rows),
        kept=len(kept),
        rejected_by_reason=rejected_frame["reason"].value_counts().to_dict() if len(rejected_frame) else {},
    )
    return rows_frame(kept), rejected_frame, report
