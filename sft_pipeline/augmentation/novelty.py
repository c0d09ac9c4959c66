"""The ROUGE-L novelty filter: a pool of texts and a candidate index that finds the pool's best match fast."""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

from sft_pipeline.text_metrics import f1_from_lcs, lcs_from_masks, rouge_tokens, token_masks

# Slack on float bounds: a pair is skipped only when its bound is below the threshold by more than this,
# so rounding can never skip a pair whose exact score is above the threshold.
_EPS = 1e-9


class NoveltyFilter:
    """The pool of known texts; a candidate is novel if its best ROUGE-L F1 against the pool is <= threshold.

    Candidate index: an inverted index token -> pool entries. ROUGE-L F1 = 2*LCS/(n+m) and LCS can not
    exceed the multiset overlap o, so F1 > t needs o > t*n/(2-t) shared token occurrences. Any entry
    with that much overlap must contain one of the candidate's (n - o_min + 1) rarest token occurrences,
    so only the posting lists of those rarest tokens are read (prefix filtering); each entry found is
    bounded by its length and overlap, and exact LCS (bit-parallel) runs only where the bound passes t.
    The result is exactly the all-pairs answer; the cost follows the rare tokens, not pool x candidates.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = 0.7) -> None:
        self.threshold = threshold
        self._texts: list[str] = []
        self._lens: list[int] = []
        self._counts: list[dict[str, int]] = []
        self._masks: list[dict[str, int]] = []
        self._postings: dict[str, list[int]] = {}
        self.pairs_scored = 0  # exact LCS computations so far (for benchmarks and metadata)
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        idx = len(self._texts)
        self._texts.append(text)
        self._lens.append(len(toks))
        counts = Counter(toks)
        self._counts.append(dict(counts))
        self._masks.append(token_masks(toks))
        for tok in counts:
            self._postings.setdefault(tok, []).append(idx)

    def _score(self, idx: int, toks: list[str]) -> float:
        self.pairs_scored += 1
        lcs = lcs_from_masks(self._masks[idx], self._lens[idx], toks)
        return f1_from_lcs(lcs, len(toks), self._lens[idx])

    def _ranked(self, counts: Counter, n: int, entries: Iterable[int], floor: float) -> list[tuple[float, int]]:
        """(upper bound, entry) for entries sharing a token whose bound is not below `floor`, best bound first."""
        out = []
        for j in entries:
            m = self._lens[j]
            total = n + m
            if 2.0 * min(n, m) / total < floor - _EPS:
                continue
            other = self._counts[j]
            overlap = 0
            for tok, c in counts.items():
                oc = other.get(tok)
                if oc:
                    overlap += c if c < oc else oc
            bound = 2.0 * overlap / total
            if overlap and bound >= floor - _EPS:
                out.append((bound, j))
        out.sort(key=lambda bj: (-bj[0], bj[1]))
        return out

    def _search(self, toks: list[str], entries: Iterable[int], floor: float) -> tuple[float, str | None]:
        best, match = 0.0, None
        for bound, j in self._ranked(Counter(toks), len(toks), entries, floor):
            if bound < max(best, floor) - _EPS:
                break  # sorted by bound: no later entry can beat the best or pass the floor
            score = self._score(j, toks)
            if score > best:
                best, match = score, self._texts[j]
        return best, match

    def _probe_entries(self, toks: list[str]) -> set[int]:
        """Pool entries that could score above the threshold: those holding one of the rarest prefix tokens."""
        n = len(toks)
        t = self.threshold
        min_overlap = max(1, math.floor(t * n / (2.0 - t) - _EPS) + 1)
        if min_overlap > n:
            return set()
        need = n - min_overlap + 1  # token occurrences to probe
        counts = Counter(toks)
        order = sorted(counts, key=lambda tok: (len(self._postings.get(tok, ())), tok))
        entries: set[int] = set()
        covered = 0
        for tok in order:
            entries.update(self._postings.get(tok, ()))
            covered += counts[tok]
            if covered >= need:
                break
        return entries

    def check(self, text: str) -> tuple[bool, float, str | None]:
        """Fast (novel?, score, pool text): the score is exact when not novel, else a lower bound <= threshold."""
        toks = rouge_tokens(text)
        if not toks or not self._texts:
            return True, 0.0, None
        best, match = self._search(toks, self._probe_entries(toks), self.threshold)
        return best <= self.threshold, best, match

    def best_match(self, text: str) -> tuple[float, str | None]:
        """Exact highest ROUGE-L F1 against the pool and the pool text that reached it (branch and bound)."""
        toks = rouge_tokens(text)
        if not toks:
            return 0.0, None
        entries: set[int] = set()
        for tok in set(toks):
            entries.update(self._postings.get(tok, ()))
        return self._search(toks, entries, 0.0)

    def is_novel(self, text: str) -> tuple[bool, float, str | None]:
        """(novel?, exact best score, best-matching pool text)."""
        novel, score, match = self.check(text)
        if novel:
            score, match = self.best_match(text)
        return novel, score, match


__all__ = ["NoveltyFilter"]
