"""Exact and near deduplication: survivors, chains, agreement with brute force, the LSH layout."""

import numpy as np
import pytest

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.curation.dedup import candidate_probability, find_near_duplicates, lsh_params
from sft_pipeline.curation.ngrams import jaccard, shingle_sets
from tests.unit.curation.samples import frame, long_text, row


def test_near_duplicates_removed_but_templated_prompts_with_different_answers_kept():
    base = "Explain why the sky looks blue during the day and red at sunset, in a few sentences for a curious child"
    answer = "Sunlight scatters off air molecules. Blue light scatters most, so the sky looks blue. At sunset light travels through more air and the blue is scattered away, leaving red and orange."
    rows = frame(
        row(base, answer, index=1),
        row(base + ".", answer + " Nice question!", index=2),  # near duplicate
        row("Translate 'good morning' to French.", "Bonjour.", index=3),
        row("Translate 'good morning' to Spanish.", "Buenos días.", index=4),  # templated prompt, different answer
    )
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert list(kept["source_index"]) == [1, 3, 4]
    assert list(rejected["reason"]) == ["near_duplicate"]
    assert kept.iloc[0]["id"] in rejected.iloc[0]["detail"]


def test_survivor_is_deterministic_and_first_in_input_order():
    rows = frame(row("Say hi", "Hi!", index=1, source="a"), row("say HI", "hi!", index=2, source="b"))
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert list(kept["source"]) == ["a"] and list(rejected["source"]) == ["b"]


def test_vectorized_near_dedup_matches_exact_jaccard_and_keeps_chains():
    a = long_text(1)
    tokens = a.split()
    b = " ".join(tokens[:30] + ["changed"] + tokens[31:])  # one edit: Jaccard ~0.91 with a
    c = " ".join(tokens[:10] + ["x1", "x2", "x3"] + tokens[13:30] + ["y1", "y2", "y3"] + tokens[33:])  # ~0.78 with a
    d = long_text(2)
    cfg = CurationConfig()
    found = find_near_duplicates([a, b, c, d, b], cfg)
    assert set(found) == {1, 4}
    assert found[1][0] == 0 and found[1][1] == pytest.approx(jaccard(*shingle_sets([a, b], 3)))
    assert found[4][0] == 0  # the earliest kept row survives, not the other copy
    # A chain: p ~ q and q ~ r but p !~ r. q goes; r stays because it only resembles a removed row.
    p = long_text(9, 200).split()
    q = list(p)
    r = list(p)
    for at in (20, 50, 80, 110, 140):
        q[at] = f"q{at}"
        r[at] = f"q{at}"
    for at in (30, 60, 90, 120, 150):
        r[at] = f"r{at}"
    sets = shingle_sets([" ".join(p), " ".join(q), " ".join(r)], 3)
    assert jaccard(sets[0], sets[1]) >= 0.85 and jaccard(sets[1], sets[2]) >= 0.85 and jaccard(sets[0], sets[2]) < 0.75
    found = find_near_duplicates([" ".join(p), " ".join(q), " ".join(r)], cfg)
    assert set(found) == {1}


def test_near_dedup_agrees_with_brute_force_on_random_corpus():
    rng = np.random.default_rng(3)
    texts, truth = [], {}
    bases = [long_text(100 + i, 50) for i in range(40)]
    for i, base in enumerate(bases):
        texts.append(base)
    for k in range(40):
        original = int(rng.integers(40))
        words = bases[original].split()
        words[int(rng.integers(len(words)))] = "edited"
        texts.append(" ".join(words))
    cfg = CurationConfig()
    sets = shingle_sets(texts, 3)
    # Brute force with the same greedy rule.
    kept, expected = [], {}
    for i in range(len(texts)):
        match = next((j for j in kept if jaccard(sets[i], sets[j]) >= cfg.near_dedup_threshold), None)
        if match is None:
            kept.append(i)
        else:
            expected[i] = match
    found = {i: j for i, (j, _) in find_near_duplicates(texts, cfg).items()}
    assert found == expected and len(found) >= 38


def test_lsh_layout_favours_recall_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        assert candidate_probability(threshold, bands, rows) >= 0.95
        assert candidate_probability(threshold / 2, bands, rows) < 0.35
    assert candidate_probability(0.4, *lsh_params(0.8, 128)) < 0.05


def test_templated_prompts_with_different_answers_survive_near_dedup():
    template = "Write a short product description for the following item, in a friendly tone, under fifty words:"
    rows = frame(*[
        row(f"{template} item {i}", f"Answer {i}: " + long_text(500 + i, 25), index=i) for i in range(20)
    ])
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert len(kept) == 20 and rejected.empty
