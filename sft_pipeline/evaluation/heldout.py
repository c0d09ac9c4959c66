"""Held-out split evaluation: token loss of a tokenized split, and greedy generations on chosen rows scored against their references."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from sft_pipeline.evaluation.answer_metrics import ROW_METRICS, row_kinds, score_generations
from sft_pipeline.modeling import forward_params, generate_responses, model_device

GENERATION_ROW_COLUMNS = ("id", "messages", "category", "kind")
GENERATION_COLUMNS = ("id", "category", "kind", "reference", "generation", *ROW_METRICS)
# Kinds whose answers are short and checkable: their generations stop at the longest reference plus this margin.
SHORT_ANSWER_KINDS = ("structured", "classification")
ANSWER_TOKEN_MARGIN = 16
# `generation_rows` 0 (every held-out row) stops at this many rows unless told otherwise.
MAX_GENERATION_ROWS = 1000


def heldout_loss(model: Any, parquet_path: str | Path, batch_size: int = 8) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over `labels != -100` of a tokenized split Parquet.

    Returns loss, perplexity, `num_tokens` (scored tokens) and `num_rows` (rows with at least one
    scored token: the evidence the gate counts); loss and perplexity are None when nothing was scored.
    """
    import torch

    frame = pd.read_parquet(parquet_path, columns=["input_ids", "attention_mask", "labels"])
    rows = [(list(a), list(m), list(lab)) for a, m, lab in
            zip(frame["input_ids"], frame["attention_mask"], frame["labels"])]
    device = model_device(model)
    forward_args = forward_params(model)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0

    total_loss = 0.0
    total_tokens = 0
    scored_rows = 0
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
            # HF convention: labels align with input_ids; token t+1 is predicted at position t.
            scored = labels[:, 1:] != -100
            if not scored.any():
                continue
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            if "use_cache" in forward_args:
                kwargs["use_cache"] = False
            logits = scored_logits(model, kwargs, scored, "logits_to_keep" in forward_args)
            loss_sum = torch.nn.functional.cross_entropy(
                logits.float(), labels[:, 1:][scored].to(logits.device), reduction="sum"
            )
            total_loss += float(loss_sum)
            total_tokens += int(scored.sum())
            scored_rows += int(scored.any(dim=1).sum())

    if total_tokens == 0:
        return {"loss": None, "perplexity": None, "num_tokens": 0}
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": _safe_exp(loss), "num_tokens": total_tokens, "num_rows": scored_rows}


def scored_logits(model: Any, kwargs: dict[str, Any], scored: Any, can_keep: bool) -> Any:
    """Logits (n, vocab) at the positions where `scored` (batch, width - 1) is true, in row-major order.

    With `logits_to_keep` (a boolean mask), the LM head projects only those positions: on the demo's
    test rows about a third of the tokens, and it spares the full-vocabulary logits of the others.
    """
    import torch

    device = kwargs["input_ids"].device
    if can_keep:
        logits = model(**kwargs, logits_to_keep=torch.nn.functional.pad(scored, (0, 1), value=False).to(device)).logits
    else:
        logits = model(**kwargs).logits
    # A model that takes logits_to_keep but returns every position is sliced here rather than run again.
    return logits if logits.dim() == 2 else logits[:, :-1, :][scored.to(device)]


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def generation_prompts(messages_list: Sequence[Any]) -> list[tuple[list[dict[str, str]], str]]:
    """(context turns, reference) per conversation: everything before the last assistant turn."""
    out = []
    for messages in messages_list:
        turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(messages)]
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("a held-out conversation has no assistant turn to compare against")
        out.append((turns[:last], turns[last]["content"]))
    return out


def answer_token_budget(tokenizer: Any, references: Sequence[str], max_new_tokens: int,
                        margin: int = ANSWER_TOKEN_MARGIN) -> int:
    """New tokens for short checkable answers: the longest reference in tokens plus `margin`, at most
    `max_new_tokens` (a JSON triage answer needs about 15 tokens; a model that rambles is cut off early
    instead of writing `max_new_tokens` tokens of prose)."""
    longest = max((len(tokenizer.encode(str(r), add_special_tokens=False)) for r in references), default=0)
    return max(1, min(int(max_new_tokens), longest + int(margin)))


def evaluate_generations(
    model: Any,
    tokenizer: Any,
    test_rows: pd.DataFrame,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: str | None = None,
) -> pd.DataFrame:
    """Greedy, batched generations for held-out rows (columns id, messages, kind; category optional), each
    scored against its reference (`answer_metrics.score_row`).

    Structured and classification rows are generated together with `answer_token_budget` new tokens, free-text
    rows with `max_new_tokens`. Returns `GENERATION_COLUMNS`: id, category, kind, reference, generation and
    the per-row metrics, in the order of `test_rows`.
    """
    prompts = generation_prompts(test_rows["messages"])
    contexts, references = [c for c, _ in prompts], [r for _, r in prompts]
    kinds = [str(k) for k in test_rows["kind"]]
    generations = [""] * len(prompts)
    short = [i for i, k in enumerate(kinds) if k in SHORT_ANSWER_KINDS]
    free = [i for i, k in enumerate(kinds) if k not in SHORT_ANSWER_KINDS]
    for idx, budget in ((short, answer_token_budget(tokenizer, [references[i] for i in short], max_new_tokens)),
                        (free, int(max_new_tokens))):
        if idx:
            answers = generate_responses(model, tokenizer, [contexts[i] for i in idx], budget, batch_size, chat_template)
            for i, answer in zip(idx, answers):
                generations[i] = answer
    scored = score_generations(references, generations, kinds)
    categories = list(test_rows["category"]) if "category" in test_rows else [None] * len(prompts)
    return pd.concat([
        pd.DataFrame({"id": list(test_rows["id"]), "category": categories, "reference": references, "generation": generations}),
        scored,
    ], axis=1).loc[:, list(GENERATION_COLUMNS)]


def read_row_categories(paths: Iterable[str | Path]) -> dict[str, str]:
    """id -> category of the rows in Parquet files with `id` and `category` columns (later files win).

    The held-out split keeps only ids and messages; the curated and synthetic rows know the category.
    Missing files, files without those columns, and empty categories are skipped.
    """
    out: dict[str, str] = {}
    for path in map(Path, paths):
        if path.is_file():
            try:
                frame = pd.read_parquet(path, columns=["id", "category"])
            except (KeyError, ValueError):
                continue
            out.update({str(i): c for i, c in zip(frame["id"], frame["category"]) if isinstance(c, str) and c})
    return out


def generation_limit(generation_rows: int, max_generation_rows: int = MAX_GENERATION_ROWS) -> int:
    """How many held-out rows to answer: `generation_rows` 0 means every row, at most `max_generation_rows`;
    n > 0 the first n; a negative value none (generation switched off)."""
    if generation_rows < 0:
        return 0
    return int(max_generation_rows) if generation_rows == 0 else int(generation_rows)


def generation_rows(test_path: str | Path, categories: Mapping[str, str], limit: int) -> pd.DataFrame:
    """The first `limit` held-out rows by id (columns id, messages, category, kind); `limit` <= 0: none.

    Each row's kind is its category's (`answer_metrics.row_kinds`, decided over every held-out row of
    that category, so one category is scored one way); rows of unknown category are judged by their reference.
    """
    if limit <= 0:
        return pd.DataFrame(columns=list(GENERATION_ROW_COLUMNS))
    frame = pd.read_parquet(test_path, columns=["id", "messages"]).sort_values("id", kind="stable")
    references = [[m for m in list(msgs) if m["role"] == "assistant"][-1]["content"] for msgs in frame["messages"]]
    frame["category"] = [categories.get(str(i)) for i in frame["id"]]
    frame["kind"] = row_kinds(list(frame["category"]), references)
    return frame.head(limit).reset_index(drop=True).loc[:, list(GENERATION_ROW_COLUMNS)]


def side_by_side_generations(base_generations: pd.DataFrame, tuned_generations: pd.DataFrame) -> pd.DataFrame:
    """One row per held-out row: the reference, both models' generations and their scores
    (both frames from `evaluate_generations` on the same rows)."""
    base, tuned = base_generations, tuned_generations
    columns = {
        "id": base["id"], "category": base["category"] if "category" in base else None, "kind": base["kind"],
        "reference": base["reference"], "base_generation": base["generation"], "tuned_generation": tuned["generation"],
    }
    for metric in ("score", *[m for m in ROW_METRICS if m != "score"]):
        columns[f"base_{metric}"], columns[f"tuned_{metric}"] = base[metric], tuned[metric]
    return pd.DataFrame(columns)
