"""Clean canonical rows: normalize text, redact or reject PII, reject invalid, over-long, refusing
or boilerplate conversations, drop rows that leak benchmark questions, and remove exact and near
duplicates; and check tables with Great Expectations suites.

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

Modules: `config` (CurationConfig), `normalize`, `pii`, `tokens`, `filters`, `ngrams` (hashed
words, shingles, n-grams), `dedup` (exact + MinHash LSH), `decontamination`, `clean`
(clean_instructions, CurationReport), `expectations` (Great Expectations suites), `screen`
(ingested rows outside the raw_instructions suite's per-row bounds, set aside before its check).
"""

from sft_pipeline.curation.clean import CurationReport, clean_instructions
from sft_pipeline.curation.config import (
    DEFAULT_BOILERPLATE_PATTERNS,
    DEFAULT_REFUSAL_PATTERNS,
    PII_ACTIONS,
    CurationConfig,
)
from sft_pipeline.curation.decontamination import benchmark_ngrams, contamination, find_contaminated
from sft_pipeline.curation.dedup import (
    candidate_probability,
    dedup_key,
    find_near_duplicates,
    lsh_params,
    minhash_band_keys,
    near_duplicates,
)
from sft_pipeline.curation.expectations import (
    EXPECTATIONS_DIR,
    ExpectationOutcome,
    SuiteEntryProblem,
    SuiteResult,
    column_range,
    conversation_view,
    curation_summary,
    ingest_summary,
    load_suite,
    suite_path,
    validate_frame,
)
from sft_pipeline.curation.filters import PhraseFilter, conversation_problem, phrase_problem
from sft_pipeline.curation.ngrams import jaccard, ngram_hashes, shingle_sets, word_hashes, words
from sft_pipeline.curation.normalize import normalize_text
from sft_pipeline.curation.pii import EMAIL, PHONE, find_pii, redact_columns, redact_pii, redact_value
from sft_pipeline.curation.screen import screen_rows
from sft_pipeline.curation.tokens import TokenCounter, approx_token_count

__all__ = [
    "CurationConfig",
    "CurationReport",
    "DEFAULT_BOILERPLATE_PATTERNS",
    "DEFAULT_REFUSAL_PATTERNS",
    "EMAIL",
    "EXPECTATIONS_DIR",
    "ExpectationOutcome",
    "PHONE",
    "PII_ACTIONS",
    "PhraseFilter",
    "SuiteEntryProblem",
    "SuiteResult",
    "TokenCounter",
    "approx_token_count",
    "benchmark_ngrams",
    "candidate_probability",
    "clean_instructions",
    "column_range",
    "contamination",
    "conversation_problem",
    "conversation_view",
    "curation_summary",
    "dedup_key",
    "find_contaminated",
    "find_near_duplicates",
    "find_pii",
    "ingest_summary",
    "jaccard",
    "load_suite",
    "lsh_params",
    "minhash_band_keys",
    "near_duplicates",
    "ngram_hashes",
    "normalize_text",
    "phrase_problem",
    "redact_columns",
    "redact_pii",
    "redact_value",
    "screen_rows",
    "shingle_sets",
    "suite_path",
    "validate_frame",
    "word_hashes",
    "words",
]
