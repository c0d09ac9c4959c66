"""Text metrics: ROUGE-L equals rouge-score's (and evaluation's held-out metric), n-gram helpers equal curation's."""

from __future__ import annotations

import random
import re

import pytest

from sft_pipeline.text_metrics import (
    first_shared_ngram,
    lcs_length,
    ngram_index,
    rouge_l_f1,
    rouge_l_from_tokens,
    rouge_tokens,
    word_ngrams,
    word_tokens,
)
from tests.unit.text_samples import dp_lcs, random_texts, reference_f1

MIXED = [
    "Don't STOP—believing, 2 times!", "Café naïve STRASSE Straße ΣΊΣΥΦΟΣ 東京 tower", "  ", "",
    "snake_case and CamelCase-words 3.14", "İstanbul ﬁle ǅemal", "the cat sat on the mat",
]


# ---------------------------------------------------------------- ROUGE-L


def test_tokenizer_and_f1_match_rouge_score_definition():
    assert rouge_tokens("Don't STOP—believing, 2 times!") == ["don", "t", "stop", "believing", "2", "times"]
    texts = random_texts(300, seed=5)
    for a, b in zip(texts, reversed(texts)):
        assert rouge_l_f1(a, b) == reference_f1(a, b)  # bit-identical, not approx


def test_rouge_l_known_pairs():
    assert rouge_l_f1("The cat sat on the mat", "the cat sat on the mat.") == 1.0
    assert rouge_l_f1("apples and pears", "quantum chromodynamics lecture") == 0.0
    assert rouge_l_f1("", "anything") == 0.0
    # LCS("the cat sat on the mat", "the cat on a mat") = the cat on mat = 4; F1 = 2*4 / (6 + 5).
    assert rouge_l_f1("the cat sat on the mat", "the cat on a mat") == pytest.approx(8 / 11)
    # Symmetric.
    assert rouge_l_f1("the cat on a mat", "the cat sat on the mat") == pytest.approx(8 / 11)


def test_lcs_length_matches_dynamic_program():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        assert lcs_length(a, b) == dp_lcs(a, b)
        assert rouge_l_from_tokens(a, b) == rouge_l_from_tokens(b, a)


def _evaluation_rouge_tokens(text: str) -> list[str]:
    # sft_pipeline.evaluation's held-out ROUGE-L as it was before text_metrics, written out.
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def _evaluation_rouge_l(prediction: str, reference: str) -> float:
    pred, ref = _evaluation_rouge_tokens(prediction), _evaluation_rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for token in pred:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_f1_serves_evaluation_bit_for_bit():
    texts = random_texts(200, seed=9) + MIXED
    for text in texts:
        assert rouge_tokens(text) == _evaluation_rouge_tokens(text)
    for prediction, reference in zip(texts, reversed(texts)):
        assert rouge_l_f1(prediction, reference) == _evaluation_rouge_l(prediction, reference)


# ---------------------------------------------------------------- word n-grams


_CURATION_WORD = re.compile(r"\w+", re.UNICODE)


def _curation_words(text: str) -> list[str]:
    # sft_pipeline.curation's decontamination n-grams as they were before text_metrics, written out.
    return _CURATION_WORD.findall(text.casefold())


def _curation_benchmark_ngrams(texts, n):
    index = {}
    for item_id, text in texts:
        tokens = _curation_words(text)
        for i in range(len(tokens) - n + 1):
            index.setdefault(tuple(tokens[i : i + n]), item_id)
    return index


def _curation_contamination(text, index, n):
    tokens = _curation_words(text)
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in index:
            return index[gram], " ".join(gram)
    return None


def test_word_tokens_fold_case_and_keep_unicode_words():
    assert word_tokens("Café STRASSE Straße snake_case 3.14") == ["café", "strasse", "strasse", "snake_case", "3", "14"]
    for text in MIXED:
        assert word_tokens(text) == _curation_words(text)


def test_ngram_index_and_first_shared_ngram_serve_curation():
    texts = random_texts(120, seed=4) + MIXED
    bench = [(f"q{i}", t) for i, t in enumerate(texts[:40])]
    for n in (1, 3, 5):
        index = ngram_index(bench, n)
        expected = _curation_benchmark_ngrams(bench, n)
        assert index == expected and list(index) == list(expected)
        for text in texts:
            hit = first_shared_ngram(text, index, n)
            want = _curation_contamination(text, expected, n)
            assert (None if hit is None else (hit[0], " ".join(hit[1]))) == want


def test_word_ngrams_and_tokenizer_choice():
    assert word_ngrams(["a", "b", "c", "a", "b"], 2) == {("a", "b"), ("b", "c"), ("c", "a")}
    assert word_ngrams(["a"], 2) == set()
    # The tokenizer is a parameter: augmentation's benchmark filter indexes rouge tokens.
    index = ngram_index(enumerate(["Don't stop now"]), 2, tokens=rouge_tokens)
    assert index == {("don", "t"): 0, ("t", "stop"): 0, ("stop", "now"): 0}
    assert first_shared_ngram("please don't", index, 2, tokens=rouge_tokens) == (0, ("don", "t"))
    assert first_shared_ngram("nothing shared here", index, 2, tokens=rouge_tokens) is None
