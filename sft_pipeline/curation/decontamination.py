"""Decontamination: find rows sharing a word n-gram with a benchmark question or its choices."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from sft_pipeline.curation.ngrams import ngram_hashes, word_hashes
from sft_pipeline.text_metrics import first_shared_ngram, ngram_index


def benchmark_ngrams(texts: Iterable[tuple[str, str]], n: int) -> dict[tuple[str, ...], str]:
    """Every n-word run of the benchmark texts, mapped to the id of the item it came from."""
    return ngram_index(texts, n)


def contamination(text: str, index: dict[tuple[str, ...], str], n: int) -> tuple[str, str] | None:
    """The first (benchmark item id, shared n-gram) this text shares with the benchmark, or None."""
    hit = first_shared_ngram(text, index, n)
    return None if hit is None else (hit[0], " ".join(hit[1]))


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
