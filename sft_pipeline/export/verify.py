"""Checking an export against the registered model: greedy answers to the held-out prompts, and the figures.

Greedy decoding here is the bare argmax at every step (no repetition penalty, no sampling, no beam), stopped
at EOS or after `max_new_tokens`. The registered model (adapter on base, as MLflow loads it) generates the
reference answers once. An export is then checked two ways:

* **regenerated**: the export generates its own greedy answers, compared token for token (the merged folder
  must reproduce every answer exactly);
* **teacher-forced**: one forward pass over prompt + reference answer; at every answer position the export's
  argmax must be the reference's next token. Greedy decoding is exactly "take the argmax given the prefix",
  so a prompt where every position agrees is a prompt whose greedy answer is identical, and the share of
  agreeing positions is how far a quantized model stays on the registered model's path. That share is the
  GGUF tolerance (`config.GGUF_MIN_AGREEMENT`).
"""

from __future__ import annotations

from typing import Any, Sequence

from sft_pipeline.export.prompts import PromptSet


class ExportVerificationError(AssertionError):
    """An export does not answer like the registered model (beyond what its format allows)."""


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's EOS ids and the tokenizer's EOS."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]) + [getattr(tokenizer, "eos_token_id", None)]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def greedy_answers(model: Any, prompts: PromptSet, max_new_tokens: int, eos_ids: Sequence[int],
                   pad_id: int | None = None) -> list[tuple[int, ...]]:
    """Each prompt's greedy answer (new token ids, the EOS included when reached), one prompt at a time: no
    padding, so nothing but the model decides the tokens."""
    import torch
    from transformers import GenerationConfig

    eos = list(eos_ids)
    config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                              eos_token_id=eos or None, pad_token_id=pad_id if pad_id is not None else (eos[0] if eos else 0))
    device = next(model.parameters()).device
    answers = []
    with torch.no_grad():
        for prompt in prompts.ids:
            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
            new = [int(t) for t in out[0, len(prompt):].tolist()]
            cut = next((i for i, t in enumerate(new) if t in eos), None)
            answers.append(tuple(new if cut is None else new[: cut + 1]))
    return answers


def compare_answers(reference: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Figures for regenerated answers: identical answers, and matching leading tokens."""
    identical = sum(tuple(a) == tuple(b) for a, b in zip(reference, answers))
    prefix = total = 0
    for ref, ans in zip(reference, answers):
        n = 0
        while n < min(len(ref), len(ans)) and ref[n] == ans[n]:
            n += 1
        prefix += n
        total += len(ref)
    return {"prompts": len(reference), "identical_answers": identical,
            "exact_match": identical / len(reference) if reference else 1.0,
            "leading_tokens_matched": prefix, "reference_tokens": total,
            "leading_token_share": prefix / total if total else 1.0}


def forced_predictions(model: Any, prompts: PromptSet, reference: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], float]:
    """`model`'s argmax at every position of every reference answer, given the reference prefix (one forward
    pass per prompt), and the largest drop from the best log-probability to the reference token's."""
    import torch

    device = next(model.parameters()).device
    predictions: list[tuple[int, ...]] = []
    worst_logprob_gap = 0.0
    with torch.no_grad():
        for prompt, answer in zip(prompts.ids, reference):
            if not answer:
                predictions.append(())
                continue
            ids = torch.tensor([list(prompt) + list(answer)], dtype=torch.long, device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
            positions = logits[len(prompt) - 1: len(prompt) - 1 + len(answer)]
            predictions.append(tuple(int(t) for t in positions.argmax(-1).tolist()))
            logprobs = torch.log_softmax(positions, -1)
            target = torch.tensor(list(answer), device=device)
            gap = (logprobs.max(-1).values - logprobs.gather(1, target[:, None])[:, 0]).max()
            worst_logprob_gap = max(worst_logprob_gap, float(gap))
    return predictions, worst_logprob_gap


def teacher_forced_agreement(model: Any, prompts: PromptSet, reference: Sequence[Sequence[int]]) -> dict[str, Any]:
    """At every position of every reference answer, whether `model`'s argmax given the reference prefix is the
    reference token. Returns the share of agreeing tokens, the prompts whose every token agrees (= identical
    greedy answers), and the largest drop in the reference token's log-probability (how close a disagreement was)."""
    predictions, gap = forced_predictions(model, prompts, reference)
    figures = agreement_figures(predictions, reference)
    figures["max_logprob_gap"] = round(gap, 6)
    return figures


def agreement_figures(predictions: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Token agreement and identical answers of teacher-forced predictions against reference answers."""
    agree = total = identical = 0
    for predicted, answer in zip(predictions, reference):
        hits = sum(int(p == a) for p, a in zip(predicted, answer))
        agree += hits
        total += len(answer)
        identical += hits == len(answer)
    n = len(reference)
    return {"prompts": n, "tokens": total, "tokens_agreeing": agree,
            "token_agreement": agree / total if total else 1.0,
            "identical_answers": identical, "exact_match": identical / n if n else 1.0}


def require(figures: dict[str, Any], *, what: str, min_agreement: float, exact: bool) -> dict[str, Any]:
    """Raise ExportVerificationError unless `figures` meet the tolerance; returns them with the verdict added."""
    agreement = figures.get("token_agreement", figures.get("leading_token_share", 0.0))
    ok = (figures["exact_match"] == 1.0) if exact else agreement >= min_agreement
    figures = {**figures, "required": "every answer identical" if exact else f"token_agreement >= {min_agreement:g}",
               "passed": bool(ok)}
    if not ok:
        raise ExportVerificationError(
            f"{what} does not answer like the registered model: {figures['identical_answers']}/{figures['prompts']} "
            f"identical answers, token agreement {agreement:.4f} (required: {figures['required']})")
    return figures


def tokenizer_agreement(reference_tokenizer: Any, other_tokenizer: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Whether `other_tokenizer` (e.g. rebuilt from GGUF metadata) encodes the prompt texts like the model's own."""
    same = sum(list(reference_tokenizer.encode(t, add_special_tokens=False)) == list(other_tokenizer.encode(t, add_special_tokens=False))
               for t in texts)
    return {"texts": len(texts), "identically_encoded": same, "share": same / len(texts) if texts else 1.0}
