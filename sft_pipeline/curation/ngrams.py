"""Word tokens and vectorized hashes of words, shingles and n-grams, shared by near-dedup and decontamination."""

from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np
import pandas as pd

from sft_pipeline.text_metrics import word_tokens as words  # noqa: F401 (the unit of shingles and n-grams)


U64 = np.uint64


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (a bijection that spreads every bit)."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def odd_constants(count: int, seed: int) -> np.ndarray:
    """`count` odd uint64 multipliers drawn from `seed` (odd, so multiplying mod 2^64 is a bijection)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2**63 - 1, size=count, dtype=np.int64).astype(np.uint64) * U64(2) + U64(1)


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text's lower-case words hashed to uint64 (one flat array) and the word count per text.

    Hashing is pandas' SipHash with its fixed key, so equal words hash equally in every process.
    """
    tokens = [words(t) for t in texts]
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
    weights = odd_constants(n, 0x5EED + n)
    combined = np.zeros(total, dtype=np.uint64)
    for k in range(n):
        term = padded[k : k + total] * weights[k]
        combined += np.where(remaining > k, term, U64(0))
    valid = remaining >= n
    if short_rows_whole:
        valid |= (position == 0) & (lengths[row_of] < n)
    grams = mix64(combined[valid])
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
