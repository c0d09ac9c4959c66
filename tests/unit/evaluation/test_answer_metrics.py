"""Exact match, token F1, ROUGE-L, JSON validity and field accuracy, task kinds and their aggregates."""

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
    # A metric no row has has no delta.
    only_gen = score_generations(["x y"], ["x y"], ["generative"])
    assert set(task_deltas(task_metrics(only_gen), task_metrics(only_gen))) == {"f1", "rouge_l", "score"}
    assert task_metrics(pd.DataFrame(columns=["kind", "exact_match", "f1", "rouge_l", "score"]))["score"] is None


def test_json_answers_parse_only_when_the_whole_answer_is_one_object():
    from sft_pipeline.evaluation.answer_metrics import parse_json_object

    assert parse_json_object('{"queue": "billing", "urgency": "high"}') == {"queue": "billing", "urgency": "high"}
    assert parse_json_object('  ```json\n{"queue": "refund", "urgency": "low"}\n```  ') == {"queue": "refund", "urgency": "low"}
    assert parse_json_object('```\n{"a": 1}\n```') == {"a": 1}
    for not_an_object in ('The queue is billing: {"queue": "billing"}', '["billing", "high"]', '{"queue": "billing",',
                          "billing, high", "", None, '"billing"'):
        assert parse_json_object(not_an_object) is None, not_an_object


def test_structured_scores_validity_field_accuracy_and_exact_match():
    from sft_pipeline.evaluation.answer_metrics import structured_scores

    ref = '{"queue": "billing", "urgency": "high"}'
    assert structured_scores('{"queue": "billing", "urgency": "high"}', ref) == {"valid": 1.0, "field_accuracy": 1.0, "exact_match": 1.0}
    # Key order, whitespace, case of string values and a code fence do not matter.
    assert structured_scores('```json\n{"urgency": " High", "queue": "Billing"}\n```', ref)["exact_match"] == 1.0
    assert structured_scores('{"queue": "billing", "urgency": "low"}', ref) == {"valid": 1.0, "field_accuracy": 0.5, "exact_match": 0.0}
    assert structured_scores('{"queue": "refund", "urgency": "low"}', ref) == {"valid": 1.0, "field_accuracy": 0.0, "exact_match": 0.0}
    # Not exactly the reference's keys, or not JSON at all: invalid, and no field counts.
    for invalid in ('{"queue": "billing"}', '{"queue": "billing", "urgency": "high", "reason": "x"}',
                    'Queue: billing. Urgency: high.', '{"queue": "billing" "urgency": "high"}'):
        assert structured_scores(invalid, ref) == {"valid": 0.0, "field_accuracy": 0.0, "exact_match": 0.0}, invalid
    # JSON values compare as JSON: true is not 1, 1 is 1.0.
    assert structured_scores('{"a": 1, "b": 1.0}', '{"a": true, "b": 1}')["field_accuracy"] == 0.5
    with pytest.raises(ValueError, match="not a JSON object"):
        structured_scores("{}", "billing")


def test_kinds_are_declared_per_category():
    from sft_pipeline.evaluation.answer_metrics import category_kinds, row_kinds

    categories = ["ticket_triage", "ticket_triage", "classification", "open_qa", "mixed", "mixed", None, None, None]
    references = ['{"queue": "billing", "urgency": "low"}', '{"queue": "refund", "urgency": "high"}', "Spam. It promises a prize.",
                  "Paris is the capital of France.", '{"a": 1}', "not json", '{"x": "y"}', "Positive.",
                  "Once upon a time there was a fox in the woods."]
    assert category_kinds(categories, references) == {"ticket_triage": "structured", "classification": "classification",
                                                      "open_qa": "generative", "mixed": "generative"}
    assert row_kinds(categories, references) == ["structured", "structured", "classification", "generative", "generative",
                                                 "generative", "structured", "classification", "generative"]
    assert task_kind(None, '{"queue": "billing"}') == "structured"


def test_every_shipped_ticket_triage_row_is_a_structured_row():
    """The demo's task data: every answer is a JSON object with queue and urgency, so the category scores as structured."""
    import json
    from pathlib import Path

    import sft_pipeline
    from sft_pipeline.evaluation.answer_metrics import category_kinds, parse_json_object, structured_scores

    rows = [json.loads(line) for line in (Path(sft_pipeline.__file__).parent / "data" / "ticket_triage.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) >= 400 and {r["category"] for r in rows} == {"ticket_triage"}
    answers = [parse_json_object(r["output"]) for r in rows]
    assert all(a is not None and set(a) == {"queue", "urgency"} for a in answers)
    assert category_kinds([r["category"] for r in rows], [r["output"] for r in rows]) == {"ticket_triage": "structured"}
    assert all(structured_scores(r["output"], r["output"])["exact_match"] == 1.0 for r in rows)


def test_scores_of_every_kind_and_the_paired_comparison():
    import pandas as pd

    from sft_pipeline.evaluation.answer_metrics import compare_task_metrics, score_generations, task_metrics

    refs = ['{"queue": "billing", "urgency": "high"}', '{"queue": "shipping", "urgency": "low"}', "Spam.", "The sea is wide."]
    kinds = ["structured", "structured", "classification", "generative"]
    base = score_generations(refs, ["I think billing, high.", '{"queue": "shipping", "urgency": "high"}', "Not spam.", "The sea."], kinds)
    tuned = score_generations(refs, ['{"queue": "billing", "urgency": "high"}', '{"queue": "shipping", "urgency": "low"}', "Spam!",
                                     "The sea is wide."], kinds)
    assert list(base.columns) == ["kind", "valid", "field_accuracy", "exact_match", "f1", "rouge_l", "score"]
    assert base["valid"].tolist()[:2] == [0.0, 1.0] and base["field_accuracy"].tolist()[:2] == [0.0, 0.5]
    assert base.loc[3, "f1"] == pytest.approx(token_f1("The sea.", "The sea is wide.")) and pd.isna(base.loc[3, "exact_match"])
    m = task_metrics(base)
    assert (m["rows"], m["structured_rows"], m["classification_rows"], m["generative_rows"]) == (4, 2, 1, 1)
    assert m["valid"] == 0.5 and m["field_accuracy"] == 0.25 and m["exact_match"] == 0.0  # over 3 checkable rows
    assert m["score"] == pytest.approx(rouge_l("The sea.", "The sea is wide.") / 4)
    for frame in (base, tuned):
        frame.insert(0, "id", ["t1", "t2", "c1", "g1"])
    task = compare_task_metrics(base, tuned.iloc[::-1].reset_index(drop=True), primary_metric="field_accuracy")
    assert task["primary_metric"] == "field_accuracy" and task["primary"] is task["paired"]["field_accuracy"]
    assert task["primary"]["n"] == 2 and task["primary"]["effect"] == pytest.approx(0.75)  # paired on id, not position
    assert task["paired"]["exact_match"]["n"] == 3 and task["paired"]["exact_match"]["test"] == "McNemar exact"
    assert task["paired"]["rouge_l"]["n"] == 1 and task["delta"]["exact_match"] == 1.0
    with pytest.raises(ValueError, match="primary_metric"):
        compare_task_metrics(base, tuned, primary_metric="accuracy")
