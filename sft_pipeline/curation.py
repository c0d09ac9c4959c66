"""Clean canonical rows: normalize text, redact or reject PII, reject invalid, over-long, refusing
or boilerplate conversations, drop rows that leak benchmark questions, and remove exact and near
duplicates.

`clean_instructions(rows, config, benchmark_texts)` returns `(kept, rejected, report)`; every
input row lands in exactly one of `kept` and `rejected`, and every rejected row carries a
machine-readable reason and a sentence naming what it matched (the survivor id of a duplicate,
the benchmark item of a contaminated row, the pattern of a refusal).

The stage runs in phases over the whole table, so the expensive parts are vectorized:

1. per row (Python): normalization, PII, structure, character bounds, refusal and boilerplate;
2. token bounds, counted in batches (a Hugging Face tokenizer, or a regex estimate);
3. decontamination: word n-grams hashed with numpy, looked up in the benchmark's n-gram hashes,
   hits confirmed on the words themselves;
4. exact duplicates: a hash of the case- and whitespace-folded conversation;
5. near duplicates: MinHash signatures computed with numpy for a chunk of rows at a time, LSH
   banding, and every candidate pair confirmed by exact Jaccard similarity of the shingle sets.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from sft_pipeline.ingest import rejects_frame, rows_frame
from sft_pipeline.schema import ROLES, conversation_id, flatten_turns, make_reject

log = logging.getLogger(__name__)

_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
# Control characters other than tab and newline carry no meaning in instruction text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_CODE_FENCE = re.compile(r"(```.*?```)", re.DOTALL)
# Markup left over from scraped HTML; removed outside code fences only, where a tag may be code.
# Block tags become line breaks, inline tags vanish, comments and script/style blocks go entirely.
_HTML_DROP = re.compile(r"<!--.*?-->|<(script|style)\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BLOCK_TAG = re.compile(
    r"</?(?:p|br|hr|div|li|ul|ol|h[1-6]|table|thead|tbody|tr|blockquote|pre|section|article|header|footer)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
_HTML_INLINE_TAG = re.compile(
    r"</?(?:span|a|b|i|em|strong|u|s|font|td|th|sup|sub|small|big|mark|abbr|code|tt|img|html|body|head|title|meta|link)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
# Runs of spaces after a non-space: collapsed. Leading indentation is left alone.
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")
_WORD = re.compile(r"\w+", re.UNICODE)
# The approximate token count: words cut into pieces of at most 6 characters, plus each
# punctuation mark. Close to a BPE tokenizer's count on English prose (within about a third).
_TOKEN_PIECE = re.compile(r"\w{1,6}|[^\w\s]", re.UNICODE)

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Phone numbers written with separators: +44 20 7946 0958, (555) 123-4567, 555.123.4567.
# A match needs at least 10 digits (8 after a leading +), so dates, versions and IPs are not phones.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?|\d{2,4}[\s.-])(?:\d{2,4}[\s.-])?\d{3,4}[\s.-]\d{3,4}(?!\w|[.-]\d)")
PII_ACTIONS = ("redact", "reject", "keep")

# Assistant turns that refuse instead of answering teach the model to refuse.
DEFAULT_REFUSAL_PATTERNS = [
    r"\bas an ai(?: language)? model\b",
    r"\bi(?:'m| am) (?:sorry|afraid),? but i (?:can(?:not|'t)|am (?:not able|unable)|won't)\b",
    r"\bi (?:can(?:not|'t)|am (?:not able|unable) to|won't) (?:help|assist) (?:you )?with (?:that|this)\b",
    r"\bi (?:can(?:not|'t)|won't) (?:comply|fulfill|provide (?:an answer|assistance)) (?:with )?(?:that|this|your)(?: request)?\b",
    r"\bi(?:'m| am) (?:just )?an ai and (?:can(?:not|'t)|don't)\b",
]
# Text that is template, scrape or model chatter rather than content, in any turn.
DEFAULT_BOILERPLATE_PATTERNS = [
    r"\blorem ipsum\b",
    r"\bas of my (?:last )?(?:knowledge|training)(?: data)? (?:cutoff|update)\b",
    r"\bmy knowledge cutoff\b",
    r"\b(?:click here to (?:subscribe|download|read more)|subscribe to our newsletter|all rights reserved|accept (?:all )?cookies)\b",
    r"\bregenerate response\b",
]


@dataclass
class CurationConfig:
    """Settings for `clean_instructions`; the defaults suit instruction-tuning data."""

    min_response_chars: int = field(default=1, metadata={"help": "A conversation whose assistant turns hold fewer characters is rejected (`empty_response`)."})
    min_conversation_chars: int = field(default=2, metadata={"help": "A conversation shorter than this, all turns together, is rejected (`too_short`)."})
    max_conversation_chars: int = field(default=12_000, metadata={"help": "A conversation longer than this, all turns together, is rejected (`too_long`)."})
    min_conversation_tokens: int = field(default=2, metadata={"help": "A conversation with fewer tokens, all turns together, is rejected (`too_few_tokens`)."})
    max_conversation_tokens: int = field(default=4096, metadata={"help": "A conversation with more tokens, all turns together, is rejected (`too_many_tokens`); 0 turns the bound off."})
    tokenizer: str = field(default="", metadata={"help": "Tokenizer that counts tokens: a local Hugging Face tokenizer folder or a hub id. Empty: a regex estimate (words in pieces of at most 6 characters, plus punctuation marks)."})
    strip_html: bool = field(default=True, metadata={"help": "Remove HTML tags, comments and script/style blocks, and unescape entities, outside code fences."})
    pii: str = field(default="redact", metadata={"help": "What to do with email addresses and phone numbers: redact (replace with [EMAIL] / [PHONE]), reject the row (`pii`), or keep."})
    filter_refusals: bool = field(default=True, metadata={"help": "Reject conversations whose assistant turns match a refusal pattern (`refusal`)."})
    refusal_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS), metadata={"help": "Case-insensitive regular expressions searched in assistant turns."})
    filter_boilerplate: bool = field(default=True, metadata={"help": "Reject conversations with a boilerplate pattern in any turn (`boilerplate`)."})
    boilerplate_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE_PATTERNS), metadata={"help": "Case-insensitive regular expressions searched in every turn."})
    exact_dedup: bool = field(default=True, metadata={"help": "Remove exact duplicates: equal conversations after case and whitespace folding (`exact_duplicate`)."})
    near_dedup: bool = field(default=True, metadata={"help": "Remove near duplicates with MinHash LSH over word shingles of the whole conversation (`near_duplicate`)."})
    near_dedup_threshold: float = field(default=0.8, metadata={"help": "Jaccard similarity of shingle sets at or above which two conversations are near duplicates (confirmed exactly)."})
    shingle_words: int = field(default=3, metadata={"help": "Words per shingle for near-duplicate detection."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations: more finds more candidate pairs and is slower."})
    lsh_recall_at_threshold: float = field(default=0.95, metadata={"help": "LSH bands are chosen so that a pair exactly at the threshold becomes a candidate with at least this probability (more similar pairs: higher)."})
    decontamination_ngram: int = field(default=13, metadata={"help": "A row sharing a run of this many words with a benchmark question or its choices is rejected; 0 turns it off."})
    seed: int = field(default=1, metadata={"help": "MinHash seed, so near-duplicate decisions are reproducible."})
    chunk_rows: int = field(default=20_000, metadata={"help": "Rows hashed per vectorized batch: bounds memory, does not change results."})

    def __post_init__(self) -> None:
        for name in ("min_response_chars", "min_conversation_chars", "min_conversation_tokens", "max_conversation_tokens", "decontamination_ngram"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_conversation_chars <= 0:
            raise ValueError(f"max_conversation_chars must be > 0, got {self.max_conversation_chars}")
        if self.min_conversation_chars > self.max_conversation_chars:
            raise ValueError(f"min_conversation_chars ({self.min_conversation_chars}) exceeds max_conversation_chars ({self.max_conversation_chars})")
        if self.max_conversation_tokens and self.min_conversation_tokens > self.max_conversation_tokens:
            raise ValueError(f"min_conversation_tokens ({self.min_conversation_tokens}) exceeds max_conversation_tokens ({self.max_conversation_tokens})")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ValueError(f"near_dedup_threshold must be in (0, 1], got {self.near_dedup_threshold}")
        if not 0.0 < self.lsh_recall_at_threshold < 1.0:
            raise ValueError(f"lsh_recall_at_threshold must be in (0, 1), got {self.lsh_recall_at_threshold}")
        if self.shingle_words < 1:
            raise ValueError(f"shingle_words must be >= 1, got {self.shingle_words}")
        if self.num_perm < 16:
            raise ValueError(f"num_perm must be >= 16, got {self.num_perm}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.pii not in PII_ACTIONS:
            raise ValueError(f"pii must be one of {PII_ACTIONS}, got {self.pii!r}")
        for name in ("refusal_patterns", "boilerplate_patterns"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from err


@dataclass
class CurationReport:
    """What `clean_instructions` did: counts in, kept, rejected per reason, redactions, timings."""

    rows_in: int
    kept: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    redactions: dict[str, int] = field(default_factory=dict)
    token_counter: str = "approx"
    kept_tokens: list[int] = field(default_factory=list)
    seconds_per_phase: dict[str, float] = field(default_factory=dict)
    lsh_bands: tuple[int, int] = (0, 0)
    near_dedup_candidates: int = 0


# ---------------------------------------------------------------- normalization


def _outside_code_fences(text: str, transform: Callable[[str], str]) -> str:
    if "```" not in text:
        return transform(text)
    parts = _CODE_FENCE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code fences
        parts[i] = transform(parts[i])
    return "".join(parts)


def _strip_markup(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _HTML_DROP.sub("", text)
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


def dedup_key(messages: Iterable[dict[str, str]]) -> str:
    """Hash of the conversation with case and all whitespace folded: equal keys are exact duplicates."""
    folded = "\x1f".join(f"{m['role']}\x1e{' '.join(m['content'].casefold().split())}" for m in messages)
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()


def words(text: str) -> list[str]:
    """Lower-case word tokens, the unit of shingles and n-grams."""
    return _WORD.findall(text.casefold())


def approx_token_count(text: str) -> int:
    """The regex token estimate used when no tokenizer is configured."""
    return len(_TOKEN_PIECE.findall(text))


class TokenCounter:
    """Counts tokens of whole conversations: with a Hugging Face tokenizer, or the regex estimate."""

    def __init__(self, tokenizer: str = ""):
        self.name = tokenizer or "approx"
        self._tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except (OSError, ValueError) as err:
                raise ValueError(f"tokenizer {tokenizer!r} could not be loaded (a local tokenizer folder or a hub id is expected): {err}") from err

    def count(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        if self._tokenizer is None:
            return np.fromiter((approx_token_count(t) for t in texts), dtype=np.int64, count=len(texts))
        counts = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            ids = self._tokenizer(batch, add_special_tokens=False)["input_ids"]
            counts[start : start + len(batch)] = [len(x) for x in ids]
        return counts


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


# ---------------------------------------------------------------- hashing words, shingles and n-grams

_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (a bijection that spreads every bit)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _odd_constants(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2**63 - 1, size=count, dtype=np.int64).astype(np.uint64) * _U64(2) + _U64(1)


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text's lower-case words hashed to uint64 (one flat array) and the word count per text.

    Hashing is pandas' SipHash with its fixed key, so equal words hash equally in every process.
    """
    tokens = [_WORD.findall(t.casefold()) for t in texts]
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    flat = np.fromiter(chain.from_iterable(tokens), dtype=object, count=int(lengths.sum()))
    hashes = pd.util.hash_array(flat, categorize=True) if len(flat) else np.zeros(0, dtype=np.uint64)
    return hashes.astype(np.uint64, copy=False), lengths


def ngram_hashes(hashes: np.ndarray, lengths: np.ndarray, n: int, *, short_rows_whole: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of `n` consecutive words inside each text, and the number per text.

    With `short_rows_whole`, a text of fewer than `n` (but at least one) words gives one hash of
    all its words, so short texts still have a shingle.
    """
    total = len(hashes)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(total) - starts[row_of]
    remaining = lengths[row_of] - position  # words from this one to the end of its text, itself included
    padded = np.concatenate([hashes, np.zeros(n, dtype=np.uint64)])
    weights = _odd_constants(n, 0x5EED + n)
    combined = np.zeros(total, dtype=np.uint64)
    for k in range(n):
        term = padded[k : k + total] * weights[k]
        combined += np.where(remaining > k, term, _U64(0))
    valid = remaining >= n
    if short_rows_whole:
        valid |= (position == 0) & (lengths[row_of] < n)
    grams = _mix64(combined[valid])
    counts = np.bincount(row_of[valid], minlength=len(lengths)).astype(np.int64)
    return grams, counts


def shingle_sets(texts: Sequence[str], n: int) -> list[np.ndarray]:
    """The sorted, unique shingle hashes of each text (for exact Jaccard similarity)."""
    hashes, lengths = word_hashes(texts)
    grams, counts = ngram_hashes(hashes, lengths, n, short_rows_whole=True)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.unique(grams[bounds[i] : bounds[i + 1]]) for i in range(len(texts))]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


# ---------------------------------------------------------------- near duplicates


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Probability that two texts of this Jaccard similarity share at least one LSH band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int, recall_at_threshold: float = 0.95) -> tuple[int, int]:
    """(bands, rows per band) for LSH over `num_perm` MinHash values.

    Candidates are confirmed by exact Jaccard, so a false candidate costs only time while a
    missed one loses a duplicate. Among the layouts whose candidate probability at the
    threshold is at least `recall_at_threshold` (pairs above the threshold fare better), take
    the one with the fewest false candidates (smallest probability area below the threshold);
    if none reaches it, the one with the highest probability at the threshold.
    """
    grid = np.linspace(0.0, threshold, 401)
    best, best_key = (1, num_perm), (False, -1.0, 0.0)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            at = candidate_probability(threshold, bands, rows)
            false_area = float(np.trapezoid(1.0 - (1.0 - grid**rows) ** bands, grid))
            reaches = at >= recall_at_threshold
            key = (reaches, -false_area if reaches else at, at)
            if key > best_key:
                best, best_key = (bands, rows), key
    return best


def minhash_band_keys(texts: Sequence[str], cfg: CurationConfig, bands: int, rows_per_band: int) -> np.ndarray:
    """LSH band keys (texts x bands, uint64) of each text's MinHash signature; 0 for texts without words.

    Signatures are computed a chunk at a time, all permutations of a chunk in one numpy pass per
    permutation; only the band keys are kept, so memory grows with bands, not with permutations.
    """
    used = bands * rows_per_band
    rng = np.random.default_rng(cfg.seed)
    # Permutations x -> ((a*x + b) mod 2^32) ^ (that >> 15), a odd: bijections on 32-bit shingle hashes.
    perm_a = (rng.integers(0, 2**31, size=used, dtype=np.int64) * 2 + 1).astype(np.uint32)
    perm_b = rng.integers(0, 2**32, size=used, dtype=np.int64).astype(np.uint32)
    band_weights = _odd_constants(rows_per_band, cfg.seed + 7)
    keys = np.zeros((len(texts), bands), dtype=np.uint64)
    shift = np.uint32(15)
    for start in range(0, len(texts), cfg.chunk_rows):
        chunk = texts[start : start + cfg.chunk_rows]
        hashes, lengths = word_hashes(chunk)
        grams, counts = ngram_hashes(hashes, lengths, cfg.shingle_words, short_rows_whole=True)
        has = counts > 0
        if not has.any():
            continue
        grams32 = (grams ^ (grams >> _U64(32))).astype(np.uint32)
        offsets = (np.cumsum(counts) - counts)[has]
        signature = np.empty((int(has.sum()), used), dtype=np.uint32)
        permuted = np.empty_like(grams32)
        for p in range(used):
            np.multiply(grams32, perm_a[p], out=permuted)
            permuted += perm_b[p]
            permuted ^= permuted >> shift
            signature[:, p] = np.minimum.reduceat(permuted, offsets)
        chunk_keys = np.zeros((len(offsets), bands), dtype=np.uint64)
        for band in range(bands):
            block = signature[:, band * rows_per_band : (band + 1) * rows_per_band].astype(np.uint64)
            chunk_keys[:, band] = _mix64((block * band_weights).sum(axis=1, dtype=np.uint64) + _U64(band + 1)) | _U64(1)
        keys[start + np.flatnonzero(has)] = chunk_keys
    return keys


def find_near_duplicates(texts: Sequence[str], cfg: CurationConfig) -> dict[int, tuple[int, float]]:
    """Map index -> (index of the earlier kept text it nearly duplicates, exact Jaccard); see `near_duplicates`."""
    return near_duplicates(texts, cfg)[0]


def near_duplicates(texts: Sequence[str], cfg: CurationConfig) -> tuple[dict[int, tuple[int, float]], int]:
    """(index -> (index of the earlier kept text it nearly duplicates, exact Jaccard), candidate rows).

    Texts are taken in order; a text is a duplicate when its exact shingle Jaccard with an
    earlier *kept* text is at least the threshold, so the survivor of a group is the first in
    input order and a chain A~B~C never removes C for resembling a removed B. LSH buckets only
    propose candidates; nothing is removed without the exact check.
    """
    bands, rows_per_band = lsh_params(cfg.near_dedup_threshold, cfg.num_perm, cfg.lsh_recall_at_threshold)
    keys = minhash_band_keys(texts, cfg, bands, rows_per_band)
    bucket = np.zeros(keys.shape, dtype=np.int64)
    shared = np.zeros(keys.shape, dtype=bool)
    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        bucket[:, band] = inverse
        shared[:, band] = (counts[inverse] > 1) & (keys[:, band] != 0)
    candidates = np.flatnonzero(shared.any(axis=1))
    if not len(candidates):
        return {}, 0
    sets = dict(zip(candidates.tolist(), _batched_shingle_sets([texts[i] for i in candidates], cfg)))
    kept_in_bucket: dict[tuple[int, int], list[int]] = {}
    duplicates: dict[int, tuple[int, float]] = {}
    for i in candidates.tolist():
        my_buckets = [(band, int(bucket[i, band])) for band in np.flatnonzero(shared[i])]
        others = sorted({j for b in my_buckets for j in kept_in_bucket.get(b, ())})
        match = None
        for j in others:
            similarity = jaccard(sets[i], sets[j])
            if similarity >= cfg.near_dedup_threshold:
                match = (j, similarity)
                break
        if match:
            duplicates[i] = match
            continue
        for b in my_buckets:
            kept_in_bucket.setdefault(b, []).append(i)
    return duplicates, len(candidates)


def _batched_shingle_sets(texts: list[str], cfg: CurationConfig) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(texts), cfg.chunk_rows):
        out.extend(shingle_sets(texts[start : start + cfg.chunk_rows], cfg.shingle_words))
    return out


# ---------------------------------------------------------------- contamination


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


def find_contaminated(texts: Sequence[str], benchmark: Sequence[tuple[str, str]], n: int, chunk_rows: int = 20_000) -> dict[int, tuple[str, str]]:
    """Map index -> (benchmark item id, shared n-gram) for texts sharing an `n`-word run with the benchmark.

    N-grams are hashed with numpy and looked up in the sorted benchmark hashes; a hit is then
    confirmed on the words themselves, so a hash collision never rejects a row.
    """
    benchmark = list(benchmark)
    if not benchmark or n <= 0 or not len(texts):
        return {}
    index = benchmark_ngrams(benchmark, n)
    bench_hashes, bench_lengths = word_hashes([text for _, text in benchmark])
    bench_grams = np.unique(ngram_hashes(bench_hashes, bench_lengths, n, short_rows_whole=False)[0])
    hits: dict[int, tuple[str, str]] = {}
    for start in range(0, len(texts), chunk_rows):
        chunk = texts[start : start + chunk_rows]
        hashes, lengths = word_hashes(chunk)
        grams, counts = ngram_hashes(hashes, lengths, n, short_rows_whole=False)
        flagged = np.isin(grams, bench_grams, assume_unique=False)
        if not flagged.any():
            continue
        rows = np.repeat(np.arange(len(chunk)), counts)[flagged]
        for r in np.unique(rows).tolist():
            hit = contamination(chunk[r], index, n)
            if hit:
                hits[start + r] = hit
    return hits


# ---------------------------------------------------------------- the stage


def _plain_messages(turns: Any) -> list[dict[str, str]]:
    if hasattr(turns, "tolist"):  # numpy arrays out of Parquet
        turns = turns.tolist()
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def _conversation_text(messages: list[dict[str, str]], with_roles: bool) -> str:
    if with_roles:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return "\n".join(m["content"] for m in messages)


def clean_instructions(
    rows: pd.DataFrame,
    cfg: CurationConfig | None = None,
    benchmark_texts: Iterable[tuple[str, str]] = (),
) -> tuple[pd.DataFrame, pd.DataFrame, CurationReport]:
    """Normalize, filter, decontaminate and deduplicate canonical rows.

    `benchmark_texts` are (item id, text) pairs: a question with its choices. Returns
    (kept rows, rejected rows, report); len(kept) + len(rejected) == len(rows). Kept rows keep
    every input column (provenance included) with normalized `messages` and fresh `id`,
    `prompt` and `response`; rejected rows are ordered by input position.
    """
    cfg = cfg or CurationConfig()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    n_rows = len(rows)
    rejected: list[tuple[int, dict[str, Any]]] = []
    refusals = PhraseFilter(cfg.refusal_patterns if cfg.filter_refusals else [])
    boilerplate = PhraseFilter(cfg.boilerplate_patterns if cfg.filter_boilerplate else [])
    redactions = {"email": 0, "phone": 0}

    messages_col = rows["messages"].tolist() if n_rows else []
    ids_col = rows["id"].tolist() if n_rows else []
    where_cols = [rows[c].tolist() if c in rows else [None] * n_rows for c in ("source", "source_file", "source_index")]

    def reject(position: int, reason: str, detail: str, raw: Any, row_id: Any) -> None:
        source, source_file, source_index = (col[position] for col in where_cols)
        if source_index is not None and pd.isna(source_index):
            source_index = None
        rejected.append(
            (position, make_reject(stage="curation", reason=reason, detail=detail, raw=raw, id=row_id,
                                   source=source, source_file=source_file, source_index=source_index))
        )

    # Phase 1: per-row normalization, PII, structure, character bounds, phrases.
    alive: list[int] = []
    normalized: dict[int, list[dict[str, str]]] = {}
    for position in range(n_rows):
        raw_messages = _plain_messages(messages_col[position])
        messages = [{"role": m["role"], "content": normalize_text(m["content"] or "", cfg.strip_html)} for m in raw_messages]
        if cfg.pii != "keep":
            if cfg.pii == "reject":
                found: dict[str, int] = {}
                for m in messages:
                    for kind, count in find_pii(m["content"]).items():
                        found[kind] = found.get(kind, 0) + count
                if found:
                    what = ", ".join(f"{count} {kind}" for kind, count in sorted(found.items()))
                    reject(position, "pii", f"holds personal data: {what}", raw_messages, ids_col[position])
                    continue
            else:
                for m in messages:
                    m["content"], counts = redact_pii(m["content"])
                    for kind, count in counts.items():
                        redactions[kind] += count
        problem = conversation_problem(messages, cfg) or phrase_problem(messages, refusals, boilerplate)
        if problem:
            reject(position, problem[0], problem[1], raw_messages, ids_col[position])
            continue
        alive.append(position)
        normalized[position] = messages
    timings["normalize_filter"] = time.perf_counter() - clock

    # Phase 2: token bounds.
    clock = time.perf_counter()
    counter = TokenCounter(cfg.tokenizer)
    token_counts = counter.count([_conversation_text(normalized[p], with_roles=False) for p in alive])
    tokens_of: dict[int, int] = {}
    survivors = []
    for position, count in zip(alive, token_counts.tolist()):
        if cfg.max_conversation_tokens and count > cfg.max_conversation_tokens:
            reject(position, "too_many_tokens", f"the conversation has {count} tokens ({counter.name}), more than {cfg.max_conversation_tokens}", normalized.pop(position), ids_col[position])
        elif count < cfg.min_conversation_tokens:
            reject(position, "too_few_tokens", f"the conversation has {count} tokens ({counter.name}), fewer than {cfg.min_conversation_tokens}", normalized.pop(position), ids_col[position])
        else:
            survivors.append(position)
            tokens_of[position] = count
    alive = survivors
    timings["token_bounds"] = time.perf_counter() - clock

    # Phase 3: decontamination.
    clock = time.perf_counter()
    new_id = {p: conversation_id(normalized[p]) for p in alive}
    if cfg.decontamination_ngram:
        texts = [_conversation_text(normalized[p], with_roles=False) for p in alive]
        hits = find_contaminated(texts, list(benchmark_texts), cfg.decontamination_ngram, cfg.chunk_rows)
        for i, (item, gram) in sorted(hits.items()):
            position = alive[i]
            detail = f"shares the {cfg.decontamination_ngram}-gram {gram!r} with benchmark item {item}"
            reject(position, "benchmark_contamination", detail, normalized.pop(position), new_id[position])
        alive = [p for p in alive if p in normalized]
    timings["decontamination"] = time.perf_counter() - clock

    # Phase 4: exact duplicates (first in input order survives).
    clock = time.perf_counter()
    if cfg.exact_dedup:
        first_by_key: dict[str, int] = {}
        survivors = []
        for position in alive:
            key = dedup_key(normalized[position])
            first = first_by_key.setdefault(key, position)
            if first != position:
                detail = f"exact duplicate of {new_id[first]} (source {where_cols[0][first]!r}, index {where_cols[2][first]})"
                reject(position, "exact_duplicate", detail, normalized.pop(position), new_id[position])
            else:
                survivors.append(position)
        alive = survivors
    timings["exact_dedup"] = time.perf_counter() - clock

    # Phase 5: near duplicates over the whole conversation, roles included.
    clock = time.perf_counter()
    bands = (0, 0)
    candidates = 0
    if cfg.near_dedup and len(alive) > 1:
        bands = lsh_params(cfg.near_dedup_threshold, cfg.num_perm, cfg.lsh_recall_at_threshold)
        texts = [_conversation_text(normalized[p], with_roles=True) for p in alive]
        near, candidates = near_duplicates(texts, cfg)
        del texts
        for i, (j, similarity) in sorted(near.items()):
            position, survivor = alive[i], alive[j]
            detail = (f"near duplicate of {new_id[survivor]} (source {where_cols[0][survivor]!r}, index {where_cols[2][survivor]}): "
                      f"shingle Jaccard {similarity:.3f} >= {cfg.near_dedup_threshold}")
            reject(position, "near_duplicate", detail, normalized.pop(position), new_id[position])
        alive = [p for p in alive if p in normalized]
    timings["near_dedup"] = time.perf_counter() - clock

    # Assemble: kept rows keep every input column; messages, id, prompt and response are rebuilt.
    clock = time.perf_counter()
    if alive:
        kept = rows.iloc[alive].reset_index(drop=True).copy()
        kept_messages = [normalized[p] for p in alive]
        kept["messages"] = kept_messages
        kept["id"] = [new_id[p] for p in alive]
        kept["prompt"] = [flatten_turns(m, "user") for m in kept_messages]
        kept["response"] = [flatten_turns(m, "assistant") for m in kept_messages]
        if "origin" in kept:
            kept["origin"] = kept["origin"].fillna("human")
        kept = rows_frame(kept)
    else:
        kept = rows_frame([])
    rejected.sort(key=lambda item: item[0])
    rejected_frame = rejects_frame([r for _, r in rejected])
    timings["assemble"] = time.perf_counter() - clock
    report = CurationReport(
        rows_in=n_rows,
        kept=len(kept),
        rejected_by_reason=rejected_frame["reason"].value_counts().to_dict() if len(rejected_frame) else {},
        redactions={k: v for k, v in redactions.items() if v},
        token_counter=counter.name,
        kept_tokens=[tokens_of[p] for p in alive],
        seconds_per_phase={k: round(v, 3) for k, v in timings.items()},
        lsh_bands=bands,
        near_dedup_candidates=candidates,
    )
    assert len(kept) + len(rejected_frame) == n_rows, "curation lost rows"
    return kept, rejected_frame, report
