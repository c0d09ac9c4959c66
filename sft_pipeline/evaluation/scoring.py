"""MMLU multiple-choice scoring in one forward pass per question, and accuracy summaries with confidence intervals."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from sft_pipeline.evaluation.mmlu import LETTERS
from sft_pipeline.evaluation.prompts import build_mmlu_contexts
from sft_pipeline.evaluation.statistics import wilson_interval
from sft_pipeline.modeling import encode_context, forward_params, left_padded_batches, model_device

PREDICTION_COLUMNS = (
    "question_id", "subject", "category", "answer", "predicted", "correct",
    *(f"logprob_{x}" for x in LETTERS),
)


def letter_token_ids(tokenizer: Any, prefix: str = " ") -> list[int]:
    """Token ids of " A".." D" (plain mode) or "A".."D" (chat mode, `prefix=""`).

    Each must be one token for the one-pass scoring to be exact.
    """
    ids = []
    for letter in LETTERS:
        enc = tokenizer.encode(f"{prefix}{letter}", add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"{prefix + letter!r} is {len(enc)} tokens {enc} for this tokenizer; one-pass MMLU scoring "
                "needs each answer letter (with its leading space in plain mode) to be a single token"
            )
        ids.append(int(enc[0]))
    return ids


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    questions: pd.DataFrame,
    batch_size: int = 8,
    fewshot: pd.DataFrame | None = None,
    prompt_format: str = "plain",
) -> pd.DataFrame:
    """Score each question with one forward pass; returns `PREDICTION_COLUMNS` in input order.

    The continuations " A".." D" ("A".."D" in chat mode) are single tokens sharing the context,
    so log P(letter | context) is the log-softmax at the last context position, read at the
    four letter ids. In chat mode the context ends with the template's newline, which the
    harness moves into the continuation: its log-probability is the same for all four letters,
    so the prediction is the same and the reported log-likelihoods omit that shared term.
    """
    import torch

    letter_ids = letter_token_ids(tokenizer, prefix=" " if prompt_format == "plain" else "")
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    forward_args = forward_params(model)

    contexts = build_mmlu_contexts(tokenizer, questions, fewshot, prompt_format)
    encoded = [encode_context(tokenizer, c) for c in contexts]
    if max_len:
        # Keep the end: the "Answer:" position is what is scored.
        encoded = [ids[-max_len:] for ids in encoded]

    logprobs: list[Any] = [None] * len(encoded)
    with torch.inference_mode():
        for idx, input_ids, attention in left_padded_batches(encoded, batch_size, pad_id):
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            if "position_ids" in forward_args:
                # Left padding would otherwise shift every position; absolute-position models care.
                kwargs["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0).to(device)
            if "logits_to_keep" in forward_args:
                kwargs["logits_to_keep"] = 1  # only the last position's vocab projection
            if "use_cache" in forward_args:
                kwargs["use_cache"] = False
            logits = model(**kwargs).logits[:, -1, :].float()
            scores = torch.log_softmax(logits, dim=-1)[:, letter_ids].cpu()
            for row, i in enumerate(idx):
                logprobs[i] = scores[row].tolist()

    out = pd.DataFrame({
        "question_id": questions["question_id"].tolist(),
        "subject": questions["subject"].tolist(),
        "category": (questions["category"].tolist() if "category" in questions.columns
                     else [None] * len(questions)),
        "answer": questions["answer"].tolist(),
    })
    for k, letter in enumerate(LETTERS):
        out[f"logprob_{letter}"] = [lp[k] for lp in logprobs]
    # Ties (practically never) go to the earliest letter, as argmax does.
    out["predicted"] = [LETTERS[max(range(4), key=lambda k: lp[k])] for lp in logprobs]
    out["correct"] = out["predicted"] == out["answer"]
    return out.loc[:, list(PREDICTION_COLUMNS)]


def summarize_accuracy(predictions: pd.DataFrame) -> dict[str, Any]:
    """Micro and macro (mean over subjects) accuracy, per subject and per category, with 95% CIs.

    `accuracy_ci` and the groups' `ci` are Wilson intervals; `macro_accuracy_ci` is the normal
    approximation with the per-subject binomial variances (subjects weighted equally).
    """
    n = int(len(predictions))
    if n == 0:
        return {"accuracy": None, "accuracy_ci": None, "macro_accuracy": None, "macro_accuracy_ci": None,
                "num_questions": 0, "per_subject": {}, "per_category": {}}
    correct = predictions["correct"].astype(bool)
    per_subject = _grouped_accuracy(correct, predictions["subject"])
    per_category = (_grouped_accuracy(correct, predictions["category"])
                    if "category" in predictions.columns else {})
    macro = sum(v["accuracy"] for v in per_subject.values()) / len(per_subject)
    macro_se = math.sqrt(sum(v["accuracy"] * (1 - v["accuracy"]) / v["n"] for v in per_subject.values())) / len(per_subject)
    z = 1.959963984540054
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci": list(wilson_interval(int(correct.sum()), n)),
        "macro_accuracy": float(macro),
        "macro_accuracy_ci": [max(0.0, macro - z * macro_se), min(1.0, macro + z * macro_se)],
        "num_questions": n,
        "per_subject": per_subject,
        "per_category": per_category,
    }


def _grouped_accuracy(correct: pd.Series, keys: pd.Series) -> dict[str, dict[str, Any]]:
    grouped = correct.groupby(keys.to_numpy(), sort=True)
    return {str(k): {"accuracy": float(g.mean()), "n": int(len(g)), "ci": list(wilson_interval(int(g.sum()), int(len(g))))}
            for k, g in grouped}
