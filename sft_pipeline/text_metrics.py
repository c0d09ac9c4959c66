"""Text similarity, one home for the project: ROUGE-L (bit-parallel LCS) and word n-gram overlap.

Two tokenizers, because two jobs need different ones and their results are pinned:

* `rouge_tokens`: rouge-score's default tokenizer (lower case, runs of ``[a-z0-9]``, no stemming).
  ROUGE-L everywhere (the Self-Instruct novelty filter, held-out task metrics) uses it, so scores
  equal rouge-score's bit for bit.
* `word_tokens`: Unicode word runs (``\\w+``) of the case-folded text. Curation's decontamination and
  near-dedup shingles use it, so non-Latin text still yields n-grams.

Every function that tokenizes takes the tokenizer as its `tokens` argument, defaulting to the one
its metric is defined with.
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

Tokenizer = Callable[[str], list[str]]
K = TypeVar("K", bound=Hashable)

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_WORD = re.compile(r"\w+", re.UNICODE)


def rouge_tokens(text: str) -> list[str]:
    """Lowercase alphanumeric word tokens: rouge-score's default tokenizer without stemming."""
    return _ROUGE_TOKEN.findall(str(text).lower())


def word_tokens(text: str) -> list[str]:
    """Case-folded Unicode word tokens (``\\w+``): the unit of decontamination n-grams and shingles."""
    return _WORD.findall(str(text).casefold())


# ---------------------------------------------------------------------------------------- ROUGE-L


def token_masks(tokens: Sequence[str]) -> dict[str, int]:
    """token -> bit mask of its positions in `tokens`: the precomputed side of `lcs_from_masks`."""
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def lcs_from_masks(masks: dict[str, int], length: int, other: Sequence[str]) -> int:
    """LCS length of the sequence behind `masks` (of `length` tokens) and `other`, bit-parallel (Hyyrö 2004).

    Precompute `token_masks` once for a text compared with many others (a pool entry)."""
    full = (1 << length) - 1
    v = full
    for tok in other:
        m = masks.get(tok)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return length - bin(v).count("1")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if not a or not b:
        return 0
    return lcs_from_masks(token_masks(a), len(a), b)


def f1_from_lcs(lcs: int, n: int, m: int) -> float:
    """ROUGE-L F1 from an LCS length and the two sequence lengths (0.0 when any is 0)."""
    # The same float operations as rouge-score's fmeasure(precision, recall), so scores match bit for bit;
    # the result does not depend on which length is n (2*p*r and p+r are exact under swapping).
    if lcs == 0 or n == 0 or m == 0:
        return 0.0
    precision, recall = lcs / m, lcs / n
    return 2 * precision * recall / (precision + recall)


def rouge_l_from_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences (symmetric)."""
    return f1_from_lcs(lcs_length(a, b), len(a), len(b))


def rouge_l_f1(a: str, b: str, tokens: Tokenizer = rouge_tokens) -> float:
    """ROUGE-L F1 between two texts (0.0 if either has no token); with the default tokenizer it equals
    rouge-score's `rougeL` fmeasure. Symmetric, so argument order (prediction, reference) does not matter."""
    return rouge_l_from_tokens(tokens(a), tokens(b))


# ---------------------------------------------------------------------------------- word n-grams


def word_ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The distinct n-token runs of a token sequence (empty when it is shorter than n)."""
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def ngram_index(items: Iterable[tuple[K, str]], n: int, tokens: Tokenizer = word_tokens) -> dict[tuple[str, ...], K]:
    """Every n-token run of the texts, mapped to the key of the first item (in `items` order) holding it."""
    index: dict[tuple[str, ...], K] = {}
    for key, text in items:
        toks = tokens(text)
        for i in range(len(toks) - n + 1):
            index.setdefault(tuple(toks[i : i + n]), key)
    return index


def first_shared_ngram(
    text: str, index: dict[tuple[str, ...], K], n: int, tokens: Tokenizer = word_tokens
) -> tuple[K, tuple[str, ...]] | None:
    """(key, n-gram) of the earliest n-token run of `text` found in `index`, or None."""
    toks = tokens(text)
    for i in range(len(toks) - n + 1):
        gram = tuple(toks[i : i + n])
        if gram in index:
            return index[gram], gram
    return None


__all__ = [
    "Tokenizer", "rouge_tokens", "word_tokens", "token_masks", "lcs_from_masks", "lcs_length", "f1_from_lcs",
    "rouge_l_from_tokens", "rouge_l_f1", "word_ngrams", "ngram_index", "first_shared_ngram",
]
