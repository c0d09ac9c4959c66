"""Scoring: MMLU multiple-choice accuracy and held-out loss for a base or fine-tuned model.

Imports only the ML stack (torch, transformers, peft lazily, pandas), so it runs on a GPU box.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import time
from collections import Counter
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


PROMPT_FORMATS = ("plain", "chat")


def mmlu_description(subject: str) -> str:
    """The harness's task description (first line of every prompt, system turn in chat mode)."""
    topic = " ".join(str(subject).split("_"))
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def format_mmlu_question(question: str, choices: Sequence[str]) -> str:
    """The harness's `doc_to_text`: question, the four lettered choices, then "Answer:"."""
    if len(choices) != 4:
        raise ValueError(f"MMLU questions have 4 choices, got {len(choices)}")
    a, b, c, d = choices
    return f"{str(question).strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def format_mmlu_prompt(
    subject: str, question: str, choices: Sequence[str], shots: Sequence[tuple[str, Sequence[str], str]] = ()
) -> str:
    """The prompt of lm-evaluation-harness's `mmlu` task, byte for byte (plain-text mode).

    `shots`: (question, choices, answer letter) examples, rendered as the harness renders
    few-shot examples: `doc_to_text + " " + letter + "\n\n"` each, after the description.
    """
    examples = "".join(f"{format_mmlu_question(q, c)} {a}\n\n" for q, c, a in shots)
    return mmlu_description(subject) + examples + format_mmlu_question(question, choices)


def mmlu_chat_messages(
    subject: str, question: str, choices: Sequence[str], shots: Sequence[tuple[str, Sequence[str], str]] = ()
) -> list[dict[str, str]]:
    """The harness's chat-template messages (`apply_chat_template=True`, few-shot as multi-turn):
    the description as system turn, each example a user turn plus an assistant turn holding the
    letter, the question as the last user turn."""
    messages = [{"role": "system", "content": mmlu_description(subject)}]
    for q, c, a in shots:
        messages += [{"role": "user", "content": format_mmlu_question(q, c)}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": format_mmlu_question(question, choices)})
    return messages


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


def _shots_by_subject(fewshot: pd.DataFrame | None) -> dict[str, list[tuple[str, list[str], str]]]:
    if fewshot is None or len(fewshot) == 0:
        return {}
    frame = fewshot.sort_values(["subject", "shot"], kind="stable") if "shot" in fewshot.columns else fewshot
    out: dict[str, list[tuple[str, list[str], str]]] = {}
    for subject, question, choices, answer in zip(frame["subject"], frame["question"], frame["choices"], frame["answer"]):
        out.setdefault(str(subject), []).append((str(question), [str(c) for c in choices], str(answer)))
    return out


def build_mmlu_contexts(
    tokenizer: Any, questions: pd.DataFrame, fewshot: pd.DataFrame | None = None, prompt_format: str = "plain"
) -> list[str]:
    """The text each question is scored after, in `questions` order.

    plain: `format_mmlu_prompt` (ends with "Answer:"; continuations " A".." D").
    chat: the tokenizer's chat template over `mmlu_chat_messages` with the generation prompt
    (continuations "A".."D"), as the harness builds it with `apply_chat_template=True`.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    shots = _shots_by_subject(fewshot)
    rows = zip(questions["subject"], questions["question"], questions["choices"])
    if prompt_format == "plain":
        return [format_mmlu_prompt(s, q, list(c), shots.get(str(s), ())) for s, q, c in rows]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format='chat' needs a tokenizer with a chat template")
    return [
        tokenizer.apply_chat_template(mmlu_chat_messages(s, q, list(c), shots.get(str(s), ())),
                                      tokenize=False, add_generation_prompt=True)
        for s, q, c in rows
    ]


def _encode_context(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a context as the harness encodes it: the tokenizer's own special-token
    handling, except that a text that already starts with BOS (a chat template wrote it) gets none."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))



def left_padded_batches(encoded: Sequence[list[int]], batch_size: int, pad_id: int):
    """Yield (row indices, input_ids, attention_mask) for length-bucketed, left-padded batches.

    Sorting by length keeps padding (wasted compute) small; left padding puts every row's last
    prompt token in the last column, where scoring reads and generation continues.
    """
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batch_size = max(1, int(batch_size))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            attention[row, width - len(encoded[i]):] = 1
        yield idx, input_ids, attention


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
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    forward_args = _forward_params(model)

    contexts = build_mmlu_contexts(tokenizer, questions, fewshot, prompt_format)
    encoded = [_encode_context(tokenizer, c) for c in contexts]
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


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval of a binomial proportion (sound at small n and near 0 or 1)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


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


def mcnemar_exact(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact (binomial) McNemar test on paired right/wrong outcomes of the same questions.

    b = right before, wrong after; c = wrong before, right after. Under "no change", b given
    b + c is Binomial(b + c, 1/2); the two-sided p-value is min(1, 2 P(X <= min(b, c))).
    Also the paired 95% CI of the accuracy delta (c - b) / n (normal approximation).
    """
    pairs = list(zip((bool(x) for x in base_correct), (bool(x) for x in tuned_correct)))
    n = len(pairs)
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    m = b + c
    if m == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2 ** m
        p_value = min(1.0, 2 * tail)
    delta = (c - b) / n if n else None
    if n:
        var = max(0.0, (b + c) / n - ((c - b) / n) ** 2) / n
        half = 1.959963984540054 * math.sqrt(var)
        delta_ci = [delta - half, delta + half]
    else:
        delta_ci = None
    return {"n": n, "base_only_correct": b, "tuned_only_correct": c, "p_value": p_value,
            "delta": delta, "delta_ci": delta_ci, "test": "McNemar exact (two-sided binomial)"}


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


def compare_evaluations(
    base_summary: dict[str, Any],
    tuned_summary: dict[str, Any],
    base_predictions: pd.DataFrame | None = None,
    tuned_predictions: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Tuned minus base: overall, macro, per-subject and per-category accuracy deltas.

    With both prediction tables, also the paired McNemar test on the questions both scored
    (`paired`); the deltas themselves come from the summaries.
    """

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
    out = {
        "base_accuracy": base_summary.get("accuracy"),
        "tuned_accuracy": tuned_summary.get("accuracy"),
        "accuracy_delta": delta(base_summary.get("accuracy"), tuned_summary.get("accuracy")),
        "macro_accuracy_delta": delta(base_summary.get("macro_accuracy"), tuned_summary.get("macro_accuracy")),
        "per_subject": grouped("per_subject"),
        "per_category": grouped("per_category"),
        # Subjects scored on one side only: their deltas would compare different questions.
        "unmatched_subjects": sorted(base_subjects ^ tuned_subjects),
    }
    if base_predictions is not None and tuned_predictions is not None:
        joined = base_predictions[["question_id", "correct"]].merge(
            tuned_predictions[["question_id", "correct"]], on="question_id", suffixes=("_base", "_tuned")
        )
        out["paired"] = mcnemar_exact(joined["correct_base"], joined["correct_tuned"])
        out["paired"]["unmatched_questions"] = int(len(base_predictions) + len(tuned_predictions) - 2 * len(joined))
    return out


# --- held-out task metrics from generations -----------------------------------------------

TASK_KINDS = ("classification", "generative")


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


def _rouge_tokens(text: str) -> list[str]:
    # rouge_score's default tokenizer: lower case, non-alphanumerics become spaces, no stemming.
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), as `rouge_score` computes it."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
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


def task_kind(category: str | None, reference: str, short_answer_words: int = 4) -> str:
    """"classification" for rows of category classification, or of unknown category whose
    reference label is at most `short_answer_words` words; "generative" otherwise."""
    if category is not None and not (isinstance(category, float) and math.isnan(category)) and str(category):
        return "classification" if str(category) == "classification" else "generative"
    return "classification" if len(answer_label(reference).split()) <= short_answer_words else "generative"


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


def generate_responses(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: str | None = None,
) -> list[str]:
    """Greedy completions of each context (rendered with the chat template), in input order."""
    import torch

    texts = [tokenizer.apply_chat_template(turns, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
             for turns in contexts]
    encoded = [_encode_context(tokenizer, t) for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [i for i in {tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)}
           if isinstance(i, int)]
    device = _model_device(model)
    outputs: list[str] = [""] * len(encoded)
    with torch.inference_mode():
        for idx, input_ids, attention in left_padded_batches(encoded, batch_size, pad_id):
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=int(max_new_tokens),
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                eos_token_id=eos or None,
            )
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return outputs


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


def evaluate_generations(
    model: Any,
    tokenizer: Any,
    test_rows: pd.DataFrame,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: str | None = None,
) -> pd.DataFrame:
    """Generate for held-out rows (columns id, messages, kind) and score each against its reference.

    Returns id, kind, reference, generation, exact_match, f1, rouge_l, score.
    """
    prompts = generation_prompts(test_rows["messages"])
    generations = generate_responses(model, tokenizer, [c for c, _ in prompts], max_new_tokens, batch_size, chat_template)
    references = [r for _, r in prompts]
    scored = score_generations(references, generations, list(test_rows["kind"]))
    return pd.concat([
        pd.DataFrame({"id": list(test_rows["id"]), "reference": references, "generation": generations}),
        scored,
    ], axis=1).loc[:, ["id", "kind", "reference", "generation", "exact_match", "f1", "rouge_l", "score"]]


# --- identity and tracking -----------------------------------------------------------------


def benchmark_fingerprint(questions: pd.DataFrame, fewshot: pd.DataFrame | None, prompt_format: str) -> str:
    """16-hex hash of what defines an MMLU score: evaluated question ids and answers, the
    few-shot examples in prompt order, and the prompt format."""
    payload = {
        "questions": sorted(zip(map(str, questions["question_id"]), map(str, questions["answer"]))),
        "fewshot": ([] if fewshot is None or not len(fewshot) else
                    [(str(s), int(k), str(q)) for s, k, q in
                     sorted(zip(fewshot["subject"], fewshot["shot"], fewshot["question_id"]))]),
        "prompt_format": prompt_format,
    }
    text = json.dumps(payload, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_digest(*paths: str | Path) -> str:
    """16-hex sha256 over the bytes of files (a data version for an asset's output)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def flatten_metrics(prefix: str, summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names for an MMLU summary: accuracy, CI bounds, per subject and category."""
    out: dict[str, float] = {}
    for key in ("accuracy", "macro_accuracy"):
        if summary.get(key) is not None:
            out[f"{prefix}{key}"] = float(summary[key])
        ci = summary.get(f"{key}_ci")
        if ci:
            out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = float(ci[0]), float(ci[1])
    for group in ("subject", "category"):
        for name, value in (summary.get(f"per_{group}") or {}).items():
            out[f"{prefix}{group}/{name}"] = float(value["accuracy"])
    return out


def log_evaluation_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float | None],
    tables: dict[str, pd.DataFrame] | None = None,
    documents: dict[str, dict] | None = None,
    tags: dict[str, str] | None = None,
    dataset: pd.DataFrame | None = None,
    dataset_name: str = "mmlu_subset",
    dataset_digest: str | None = None,
) -> str:
    """One MLflow run holding the params, metrics, tables (`log_table`), JSON documents and the
    evaluated question subset as a dataset input. Returns the run id. Imports mlflow lazily."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    try:
        from sft_pipeline.registry import ensure_experiment

        experiment_id = ensure_experiment(tracking_uri, experiment)
    except ImportError:  # pragma: no cover - registry is part of this package
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        clean_metrics = [Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()
                         if v is not None and math.isfinite(float(v))]
        clean_params = [Param(_metric_key(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, max(len(clean_metrics), len(clean_params)), 900):
            client.log_batch(run_id, metrics=clean_metrics[start:start + 900], params=clean_params[start:start + 900],
                             tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()] if start == 0 else [],
                             synchronous=True)
        for name, frame in (tables or {}).items():
            client.log_table(run_id, data=_json_safe_frame(frame), artifact_file=name)
        for name, document in (documents or {}).items():
            client.log_dict(run_id, document, name)
        if dataset is not None:
            ds = mlflow.data.from_pandas(_json_safe_frame(dataset), name=dataset_name, digest=dataset_digest)
            client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "evaluation")])])
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _metric_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; map anything else to _.
    return "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in str(name))


def _json_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, (list, tuple, dict)) or hasattr(v, "tolist")).any():
            out[column] = out[column].map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=str))
    return out


# --- helpers ----------------------------------------------------------------------------


def _grouped_accuracy(correct: pd.Series, keys: pd.Series) -> dict[str, dict[str, Any]]:
    grouped = correct.groupby(keys.to_numpy(), sort=True)
    return {str(k): {"accuracy": float(g.mean()), "n": int(len(g)), "ci": list(wilson_interval(int(g.sum()), int(len(g))))}
            for k, g in grouped}


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
