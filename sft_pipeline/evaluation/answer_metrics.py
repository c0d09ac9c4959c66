"""Per-answer metrics of generations against references, task kinds and their aggregates.

Three kinds of held-out row, each with a checkable score:

* **structured**: the reference is a JSON object (`{"queue": "billing", "urgency": "high"}`): `valid` (the
  generation is a JSON object with exactly the reference's keys), `field_accuracy` (share of the reference's
  fields the generation got equal; 0 when invalid) and `exact_match` (every field equal);
* **classification**: exact match of the answer's label (`answer_label`) and SQuAD token F1;
* **generative** (free text): ROUGE-L and SQuAD token F1.

`score` (one number per row, whatever its kind) is exact match on structured and classification rows and
ROUGE-L on generative rows.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from sft_pipeline.text_metrics import rouge_l_f1

TASK_KINDS = ("structured", "classification", "generative")
# Per-row metrics; each is None on rows of a kind it does not apply to.
ROW_METRICS = ("valid", "field_accuracy", "exact_match", "f1", "rouge_l", "score")
# The aggregate scores of `task_metrics` that are compared between models; any of them may be the gate's primary metric.
TASK_METRIC_KEYS = ROW_METRICS
# Which kinds of row carry each metric (for messages about a metric no row has).
METRIC_KINDS = {"valid": ("structured",), "field_accuracy": ("structured",), "exact_match": ("structured", "classification"),
                "f1": ("classification", "generative"), "rouge_l": ("generative",), "score": TASK_KINDS}
# Categories that declare their kind by name; other categories are structured when every reference of
# theirs is a JSON object, generative otherwise.
CATEGORY_KINDS = {"classification": "classification"}

_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


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


def parse_json_object(text: Any) -> dict[str, Any] | None:
    """The JSON object a text is, or None.

    The whole text (surrounding whitespace aside) must be one JSON object; a single Markdown code fence
    around it (```json ... ```) is removed first. A JSON object inside prose is not an answer in the format.
    """
    if not isinstance(text, str):
        return None
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _field_equal(predicted: Any, reference: Any) -> bool:
    # Strings compare without surrounding whitespace and case ("Billing" is the label billing); other
    # values as JSON values (true and 1 differ, 1 and 1.0 do not).
    if isinstance(predicted, str) and isinstance(reference, str):
        return predicted.strip().casefold() == reference.strip().casefold()
    if isinstance(predicted, bool) or isinstance(reference, bool):
        return type(predicted) is type(reference) and predicted == reference
    return predicted == reference


def structured_scores(prediction: str, reference: str | Mapping[str, Any]) -> dict[str, float]:
    """`valid`, `field_accuracy` and `exact_match` of a generation against a JSON-object reference.

    valid = 1 when the generation parses as a JSON object (`parse_json_object`) whose keys are exactly the
    reference's; field_accuracy = (fields equal) / (reference fields), 0 when invalid; exact_match = 1 when
    valid and every field is equal.
    """
    ref = parse_json_object(reference) if isinstance(reference, str) else dict(reference)
    if ref is None:
        raise ValueError(f"the reference of a structured row is not a JSON object: {str(reference)[:120]!r}")
    pred = parse_json_object(prediction)
    if pred is None or set(pred) != set(ref):
        return {"valid": 0.0, "field_accuracy": 0.0, "exact_match": 0.0}
    equal = sum(_field_equal(pred[k], v) for k, v in ref.items())
    return {"valid": 1.0, "field_accuracy": equal / len(ref) if ref else 1.0, "exact_match": float(equal == len(ref))}


def _known(category: Any) -> bool:
    return category is not None and not (isinstance(category, float) and math.isnan(category)) and bool(str(category))


def task_kind(category: str | None, reference: str, short_answer_words: int = 4) -> str:
    """The kind of one row on its own: "structured" when the reference is a JSON object; else
    "classification" for category classification, "generative" for any other known category; rows of
    unknown category are classification when the reference's label is at most `short_answer_words` words.

    `category_kinds` decides for a whole category at once, which is what the held-out evaluation uses.
    """
    if parse_json_object(reference) is not None:
        return "structured"
    if _known(category):
        return CATEGORY_KINDS.get(str(category), "generative")
    return "classification" if len(answer_label(reference).split()) <= short_answer_words else "generative"


def category_kinds(categories: Iterable[Any], references: Iterable[str]) -> dict[str, str]:
    """The kind each known category declares for all of its rows: its name in `CATEGORY_KINDS`, else
    "structured" when every reference of the category is a JSON object, else "generative"."""
    refs: dict[str, list[str]] = {}
    for category, reference in zip(categories, references):
        if _known(category):
            refs.setdefault(str(category), []).append(reference)
    return {category: CATEGORY_KINDS.get(category) or
            ("structured" if all(parse_json_object(r) is not None for r in values) else "generative")
            for category, values in refs.items()}


def row_kinds(categories: Sequence[Any], references: Sequence[str], short_answer_words: int = 4) -> list[str]:
    """The kind of each row: its category's (`category_kinds`) when the category is known, else `task_kind`."""
    declared = category_kinds(categories, references)
    return [declared[str(c)] if _known(c) else task_kind(None, r, short_answer_words) for c, r in zip(categories, references)]


def score_row(prediction: str, reference: str, kind: str) -> dict[str, float | None]:
    """Every `ROW_METRICS` value of one answer (None where the metric does not apply to `kind`)."""
    row: dict[str, float | None] = dict.fromkeys(ROW_METRICS)
    if kind == "structured":
        row.update(structured_scores(prediction, reference))
        row["score"] = row["exact_match"]
    elif kind == "classification":
        row.update(exact_match=exact_match(prediction, reference), f1=token_f1(prediction, reference))
        row["score"] = row["exact_match"]
    elif kind == "generative":
        row.update(rouge_l=rouge_l(prediction, reference), f1=token_f1(prediction, reference))
        row["score"] = row["rouge_l"]
    else:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    return row


def score_generations(references: Sequence[str], predictions: Sequence[str], kinds: Sequence[str]) -> pd.DataFrame:
    """Per-row `kind` and `ROW_METRICS` (see `score_row`)."""
    rows = [{"kind": kind, **score_row(pred, ref, kind)} for ref, pred, kind in zip(references, predictions, kinds)]
    return pd.DataFrame(rows, columns=["kind", *ROW_METRICS])


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def task_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """Aggregate per-row task scores (columns kind and `ROW_METRICS`): row counts per kind, and the mean of
    each metric over the rows that have it (None when none has it)."""
    out: dict[str, Any] = {"rows": int(len(frame))}
    for kind in TASK_KINDS:
        out[f"{kind}_rows"] = int((frame["kind"] == kind).sum()) if len(frame) else 0
    for metric in ROW_METRICS:
        out[metric] = _mean(frame[metric]) if len(frame) and metric in frame else None
    return out


def task_deltas(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """Tuned minus base of each `task_metrics` score both sides have."""
    return {k: (tuned[k] - base[k]) for k in TASK_METRIC_KEYS if tuned.get(k) is not None and base.get(k) is not None}


def paired_metric_scores(base_generations: pd.DataFrame, tuned_generations: pd.DataFrame, metric: str) -> tuple[list[float], list[float]]:
    """Base and tuned per-row values of `metric` on the rows (joined on `id`, else by position) where both have it."""
    if "id" in base_generations and "id" in tuned_generations:
        joined = base_generations[["id", metric]].merge(tuned_generations[["id", metric]], on="id", suffixes=("_base", "_tuned"))
    else:
        if len(base_generations) != len(tuned_generations):
            raise ValueError("generations without ids are paired by position and need the same number of rows")
        joined = pd.DataFrame({f"{metric}_base": list(base_generations[metric]), f"{metric}_tuned": list(tuned_generations[metric])})
    keep = joined[f"{metric}_base"].notna() & joined[f"{metric}_tuned"].notna()
    return [float(v) for v in joined.loc[keep, f"{metric}_base"]], [float(v) for v in joined.loc[keep, f"{metric}_tuned"]]


def compare_task_metrics(base_generations: pd.DataFrame, tuned_generations: pd.DataFrame,
                         primary_metric: str = "exact_match", seed: int = 0) -> dict[str, Any]:
    """Both models' scored generations (`evaluate_generations`, same rows) compared.

    {"base": task_metrics, "tuned": task_metrics, "delta": task_deltas,
     "paired": {metric: statistics.paired_difference_test over the rows both have it} (metrics some row has),
     "primary_metric": name, "primary": paired["<primary_metric>"] or None when no row has it}.
    """
    from sft_pipeline.evaluation.statistics import paired_difference_test

    if primary_metric not in TASK_METRIC_KEYS:
        raise ValueError(f"primary_metric must be one of {TASK_METRIC_KEYS}, got {primary_metric!r}")
    task: dict[str, Any] = {"base": task_metrics(base_generations), "tuned": task_metrics(tuned_generations)}
    task["delta"] = task_deltas(task["base"], task["tuned"])
    paired = {}
    for metric in TASK_METRIC_KEYS:
        base_scores, tuned_scores = paired_metric_scores(base_generations, tuned_generations, metric)
        if base_scores:
            paired[metric] = {"metric": metric, **paired_difference_test(base_scores, tuned_scores, seed=seed)}
    task["paired"] = paired
    task["primary_metric"] = primary_metric
    task["primary"] = paired.get(primary_metric)
    return task
