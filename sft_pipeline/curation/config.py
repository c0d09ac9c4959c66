"""CurationConfig: every setting of `clean_instructions`, with help text, and the default phrase patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
    max_turns: int = field(default=200, metadata={"help": "A conversation with more turns (system included) is rejected (`too_many_turns`). Ingest already sets aside rows above the raw_instructions suite's num_turns bound (200)."})
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
        if self.max_turns < 2:
            raise ValueError(f"max_turns must be >= 2 (a user and an assistant turn), got {self.max_turns}")
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
