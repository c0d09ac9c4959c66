"""The ROUGE-L novelty filter: the candidate index keeps exactly the all-pairs set, and prunes."""

from __future__ import annotations

import pytest

from sft_pipeline.augmentation.novelty import NoveltyFilter
from tests.unit.augmentation.helpers import SEEDS
from tests.unit.text_samples import random_texts, reference_f1


@pytest.mark.parametrize("threshold", [0.0, 0.7, 1.0])
def test_candidate_index_keeps_exactly_the_all_pairs_set(threshold):
    texts = random_texts(300, seed=11)
    f = NoveltyFilter(texts[:20], threshold=threshold)
    pool = list(texts[:20])
    kept_fast, kept_ref = [], []
    for t in texts[20:]:
        best = max((reference_f1(p, t) for p in pool), default=0.0)
        novel, score, _ = f.check(t)
        assert novel == (best <= threshold), (t, best, score)
        if not novel:
            assert score == best  # exact when rejecting
        exact_novel, exact, _ = f.is_novel(t)
        assert exact == best and exact_novel == novel
        if best <= threshold:
            kept_ref.append(t)
            pool.append(t)
        if novel:
            kept_fast.append(t)
            f.add(t)
    assert kept_fast == kept_ref
    assert len(f) == len(pool)


def test_candidate_index_skips_most_pairs():
    texts = random_texts(1500, seed=3)
    f = NoveltyFilter(texts[:50], threshold=0.7)
    all_pairs = 0
    for t in texts[50:]:
        all_pairs += len(f)
        if f.check(t)[0]:
            f.add(t)
    # The bound prunes: exact LCS runs on a small share of what an all-pairs loop scores.
    assert f.pairs_scored < all_pairs / 5


def test_novelty_filter_rejects_near_copy_keeps_novel():
    f = NoveltyFilter([s for s, _ in SEEDS], threshold=0.7)
    novel, score, match = f.is_novel("Write a short poem about the ocean.")
    assert not novel and score > 0.7 and match == "Write a short poem about the sea."
    novel, score, _ = f.is_novel("Give three tips for staying healthy during winter.")
    assert novel and score <= 0.7
    f.add("Give three tips for staying healthy during winter.")
    assert not f.is_novel("give three tips for staying healthy during winter")[0]
    assert len(f) == len(SEEDS) + 1
