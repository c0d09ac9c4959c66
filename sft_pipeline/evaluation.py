"""Scoring: MMLU multiple-choice accuracy and held-out loss for a base or fine-tuned model.

Imports only the ML stack (torch, transformers, peft lazily, pandas), so it runs on a GPU box.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

LETTERS = ("A", "B", "C", "D")
PREDICTION_COLUMNS = (
    "question_id", "subject", "category", "answer", "predicted", "correct",
    *(f"logprob_{x}" for x in LETTERS),
)


def load_model_for_eval(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load a local HF model (plus an optional PEFT adapter, merged) ready for scoring."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = str(device).startswith("cuda")
    # fp32 on CPU (bf16 matmuls there are slow and lossy); bf16 on GPUs that support it.
    dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"  # the last position is then the next-token slot for every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        try:
            # Merged weights score as fast as the base model; adapters that cannot merge
            # (prompt tuning and the like) still work unmerged.
            model = model.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError):
            pass
    model.to(device)
    model.eval()
    return model, tokenizer


def format_mmlu_prompt(subject: str, question: str, choices: Sequence[str]) -> str:
    """The zero-shot prompt of lm-evaluation-harness's `mmlu` task, byte for byte."""
    if len(choices) != 4:
        raise ValueError(f"MMLU questions have 4 choices, got {len(choices)}")
    topic = " ".join(str(subject).split("_"))
    a, b, c, d = choices
    return (
        f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        f"{str(question).strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    )


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of " A".." D"; each must be one token for the one-pass scoring to be exact."""
    ids = []
    for letter in LETTERS:
        enc = tokenizer.encode(f" {letter}", add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"' {letter}' is {len(enc)} tokens {enc} for this tokenizer; one-pass MMLU scoring "
                "needs each answer letter (with its leading space) to be a single token"
            )
        ids.append(int(enc[0]))
    return ids


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    questions: pd.DataFrame,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Score each question with one forward pass; returns `PREDICTION_COLUMNS` in input order.

    The continuations " A".." D" are single tokens sharing the prompt, so log P(" X" | prompt)
    is the log-softmax at the last prompt position, read at the four letter ids.
    """
    import torch

    letter_ids = letter_token_ids(tokenizer)
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    forward_args = _forward_params(model)

    prompts = [format_mmlu_prompt(s, q, c) for s, q, c in
               zip(questions["subject"], questions["question"], questions["choices"])]
    encoded = [tokenizer.encode(p) for p in prompts]  # the tokenizer's own BOS handling
    if max_len:
        # Keep the end: the "Answer:" position is what is scored.
        encoded = [ids[-max_len:] for ids in encoded]

    # Length buckets: sorting by length keeps padding (wasted compute) small.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logprobs = [None] * len(encoded)
    batch_size = max(1, int(batch_size))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
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
    """Micro and macro (mean over subjects) accuracy, plus per-subject and per-category."""
    n = int(len(predictions))
    if n == 0:
        return {"accuracy": None, "macro_accuracy": None, "num_questions": 0,
                "per_subject": {}, "per_category": {}}
    correct = predictions["correct"].astype(bool)
    per_subject = _grouped_accuracy(correct, predictions["subject"])
    per_category = (_grouped_accuracy(correct, predictions["category"])
                    if "category" in predictions.columns else {})
    return {
        "accuracy": float(correct.mean()),
        "macro_accuracy": float(sum(v["accuracy"] for v in per_subject.values()) / len(per_subject)),
        "num_questions": n,
        "per_subject": per_subject,
        "per_category": per_category,
    }


def heldout_loss(model: Any, parquet_path: str | Path, batch_size: int = 8) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over `labels != -100` of a tokenized split Parquet."""
    import torch

    frame = pd.read_parquet(parquet_path, columns=["input_ids", "attention_mask", "labels"])
    rows = [(list(a), list(m), list(lab)) for a, m, lab in
            zip(frame["input_ids"], frame["attention_mask"], frame["labels"])]
    device = _model_device(model)
    forward_args = _forward_params(model)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0

    total_loss = 0.0
    total_tokens = 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batch_size = max(1, int(batch_size))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(rows[i][0]) for i in idx)
            # Right padding: positions of real tokens stay 0..n-1, pads are masked and unlabeled.
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                ids, mask, lab = rows[i]
                input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, :len(mask)] = torch.tensor(mask, dtype=torch.long)
                labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            if "use_cache" in forward_args:
                kwargs["use_cache"] = False
            logits = model(**kwargs).logits.float()
            # HF convention: labels align with input_ids; token t+1 is predicted at position t.
            shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss_sum = torch.nn.functional.cross_entropy(
                shift_logits, shift_labels, ignore_index=-100, reduction="sum"
            )
            total_loss += float(loss_sum)
            total_tokens += int((shift_labels != -100).sum())

    if total_tokens == 0:
        return {"loss": None, "perplexity": None, "num_tokens": 0}
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": _safe_exp(loss), "num_tokens": total_tokens}


def compare_evaluations(base_summary: dict[str, Any], tuned_summary: dict[str, Any]) -> dict[str, Any]:
    """Tuned minus base: overall, macro, per-subject and per-category accuracy deltas."""

    def delta(a, b):
        return None if a is None or b is None else float(b) - float(a)

    def grouped(key):
        base, tuned = base_summary.get(key) or {}, tuned_summary.get(key) or {}
        return {
            name: {
                "base": base[name]["accuracy"],
                "tuned": tuned[name]["accuracy"],
                "delta": delta(base[name]["accuracy"], tuned[name]["accuracy"]),
                "n": tuned[name].get("n"),
            }
            for name in sorted(set(base) & set(tuned))
        }

    base_subjects = set(base_summary.get("per_subject") or {})
    tuned_subjects = set(tuned_summary.get("per_subject") or {})
    return {
        "base_accuracy": base_summary.get("accuracy"),
        "tuned_accuracy": tuned_summary.get("accuracy"),
        "accuracy_delta": delta(base_summary.get("accuracy"), tuned_summary.get("accuracy")),
        "macro_accuracy_delta": delta(base_summary.get("macro_accuracy"), tuned_summary.get("macro_accuracy")),
        "per_subject": grouped("per_subject"),
        "per_category": grouped("per_category"),
        # Subjects scored on one side only: their deltas would compare different questions.
        "unmatched_subjects": sorted(base_subjects ^ tuned_subjects),
    }


# --- helpers ----------------------------------------------------------------------------


def _grouped_accuracy(correct: pd.Series, keys: pd.Series) -> dict[str, dict[str, Any]]:
    grouped = correct.groupby(keys.to_numpy(), sort=True)
    return {str(k): {"accuracy": float(g.mean()), "n": int(len(g))} for k, g in grouped}


def _model_device(model: Any):
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _forward_params(model: Any) -> set[str]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    return set(params)


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
