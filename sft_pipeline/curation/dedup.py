"""Exact duplicates (folded-conversation digest) and near duplicates (MinHash LSH confirmed by exact Jaccard)."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.curation.ngrams import U64, jaccard, mix64, ngram_hashes, odd_constants, shingle_sets, word_hashes
from sft_pipeline.hashing import text_digest


def dedup_key(messages: Iterable[dict[str, str]]) -> str:
    """Hash of the conversation with case and all whitespace folded: equal keys are exact duplicates."""
    folded = "\x1f".join(f"{m['role']}\x1e{' '.join(m['content'].casefold().split())}" for m in messages)
    return text_digest(folded)


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
    band_weights = odd_constants(rows_per_band, cfg.seed + 7)
    keys = np.zeros((len(texts), bands), dtype=np.uint64)
    shift = np.uint32(15)
    for start in range(0, len(texts), cfg.chunk_rows):
        chunk = texts[start : start + cfg.chunk_rows]
        hashes, lengths = word_hashes(chunk)
        grams, counts = ngram_hashes(hashes, lengths, cfg.shingle_words, short_rows_whole=True)
        has = counts > 0
        if not has.any():
            continue
        grams32 = (grams ^ (grams >> U64(32))).astype(np.uint32)
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
            chunk_keys[:, band] = mix64((block * band_weights).sum(axis=1, dtype=np.uint64) + U64(band + 1)) | U64(1)
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
