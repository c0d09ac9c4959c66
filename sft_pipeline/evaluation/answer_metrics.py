"""Per-answer metrics of generations against references (exact match, token F1, ROUGE-L), task kinds and their aggregates."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import pandas as pd

from sft_pipeline.text_metrics import rouge_l_f1

TASK_KINDS = ("classification", "generative")
# The aggregate scores of `task_metrics` that are compared between models.
TASK_METRIC_KEYS = ("exact_match", "f1", "rouge_l", "score")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_label(text: str) -> str:
    """The label of a classification answer: its first line up to the first sentence end, normalized.

    "Spam. It creates false urgency..." -> "spam"; "Mixed." -> "mixed".
    """
    first = str(text).strip().split("\n", 1)[0]
    for stop in (". ", "! ", "? "):
        first = first.split(stop, 1)[0]
    return normalize_answer(first)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the labels (`answer_label`) of prediction and reference are equal."""
    return float(answer_label(prediction) == answer_label(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 of the normalized texts."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), as `rouge_score` computes it."""
    return rouge_l_f1(prediction, reference)


def task_kind(category: str | None, reference: str, short_answer_words: int = 4) -> str:
    """"classification" for rows of category classification, or of unknown category whose
    reference label is at most `short_answer_words` words; "generative" otherwise."""
    if category is not None and not (isinstance(category, float) and math.isnan(category)) and str(category):
        return "classification" if str(category) == "classification" else "generative"
    return "classification" if len(answer_label(reference).split()) <= short_answer_words else "generative"


def task_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """Aggregate per-row task scores (columns kind, exact_match, f1, rouge_l, score).

    `score` (the gate's task score) is exact match on classification rows and ROUGE-L on
    generative rows, averaged over all rows.
    """
    def mean(values):
        values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return sum(values) / len(values) if values else None

    cls = frame[frame["kind"] == "classification"] if len(frame) else frame
    gen = frame[frame["kind"] == "generative"] if len(frame) else frame
    return {
        "rows": int(len(frame)),
        "classification_rows": int(len(cls)),
        "generative_rows": int(len(gen)),
        "exact_match": mean(cls["exact_match"]) if len(cls) else None,
        "f1": mean(cls["f1"]) if len(cls) else None,
        "rouge_l": mean(gen["rouge_l"]) if len(gen) else None,
        "score": mean(frame["score"]) if len(frame) else None,
    }


def score_generations(references: Sequence[str], predictions: Sequence[str], kinds: Sequence[str]) -> pd.DataFrame:
    """Per-row exact match and F1 (classification rows), ROUGE-L (generative rows) and `score`."""
    rows = []
    for ref, pred, kind in zip(references, predictions, kinds):
        if kind == "classification":
            em, f1 = exact_match(pred, ref), token_f1(pred, ref)
            rows.append({"kind": kind, "exact_match": em, "f1": f1, "rouge_l": None, "score": em})
        else:
            rl = rouge_l(pred, ref)
            rows.append({"kind": kind, "exact_match": None, "f1": None, "rouge_l": rl, "score": rl})
    return pd.DataFrame(rows, columns=["kind", "exact_match", "f1", "rouge_l", "score"])


def task_deltas(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """Tuned minus base of each `task_metrics` score both sides have (`score` is the gate's)."""
    return {k: (tuned[k] - base[k]) for k in TASK_METRIC_KEYS if tuned[k] is not None and base[k] is not None}


def compare_task_metrics(base_generations: pd.DataFrame, tuned_generations: pd.DataFrame) -> dict[str, Any]:
    """`task_metrics` of both models' scored generations (`evaluate_generations`) and their `task_deltas`:
    {"base": ..., "tuned": ..., "delta": ...}."""
    task = {"base": task_metrics(base_generations), "tuned": task_metrics(tuned_generations)}
    task["delta"] = task_deltas(task["base"], task["tuned"])
    return task
