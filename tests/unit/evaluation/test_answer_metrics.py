"""Exact match, token F1, ROUGE-L, task kinds and their aggregates."""

import pytest

from sft_pipeline.evaluation.answer_metrics import answer_label, exact_match, rouge_l, task_kind, token_f1


def test_text_metrics():
    assert answer_label("Spam. It creates false urgency.") == "spam"
    assert exact_match("spam!", "Spam. It creates false urgency.") == 1.0
    assert exact_match("Not spam.", "Spam.") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "abc") == 0.0
    assert task_kind("classification", "long answer " * 10) == "classification"
    assert task_kind("open_qa", "Yes.") == "generative"
    assert task_kind(None, "Positive.") == "classification" and task_kind(None, "one two three four five six") == "generative"


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("The quick brown fox jumps.", "A quick brown dog jumps over it."),
             ("Paris is the capital of France", "The capital of France is Paris."),
             ("def add(a, b): return a+b", "def add(x, y):\n    return x + y"), ("nothing", "entirely different")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure, abs=1e-9)


def test_task_metrics_and_deltas():
    import pandas as pd

    from sft_pipeline.evaluation.answer_metrics import compare_task_metrics, score_generations, task_deltas, task_metrics

    base = score_generations(["Spam.", "The sea is wide."], ["Not spam.", "The sea."], ["classification", "generative"])
    tuned = score_generations(["Spam.", "The sea is wide."], ["Spam!", "The sea is wide."], ["classification", "generative"])
    m = task_metrics(tuned)
    assert (m["rows"], m["classification_rows"], m["generative_rows"]) == (2, 1, 1)
    assert m["exact_match"] == 1.0 and m["rouge_l"] == 1.0 and m["score"] == 1.0
    task = compare_task_metrics(base, tuned)
    assert task["delta"] == task_deltas(task["base"], task["tuned"])
    assert task["delta"]["exact_match"] == 1.0 and task["delta"]["score"] == pytest.approx(1.0 - task["base"]["score"])
    # A metric missing on one side has no delta.
    only_gen = score_generations(["x y"], ["x y"], ["generative"])
    assert set(task_deltas(task_metrics(only_gen), task_metrics(only_gen))) == {"rouge_l", "score"}
    assert task_metrics(pd.DataFrame(columns=["kind", "exact_match", "f1", "rouge_l", "score"]))["score"] is None
