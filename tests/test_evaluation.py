import math

import pandas as pd
import pytest
import torch

from sft_pipeline.benchmark import load_mmlu
from sft_pipeline.evaluation import (
    PREDICTION_COLUMNS,
    compare_evaluations,
    format_mmlu_prompt,
    heldout_loss,
    letter_token_ids,
    load_model_for_eval,
    score_multiple_choice,
    summarize_accuracy,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model_for_eval(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def questions():
    # Real MMLU text of varied lengths, so batches need padding.
    return load_mmlu(subjects=["astronomy", "marketing", "abstract_algebra"], questions_per_subject=3)


def test_prompt_matches_lm_eval_harness():
    prompt = format_mmlu_prompt("high_school_biology", "  What is DNA?\n", ["a", "b", "c", "d"])
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What is DNA?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def test_loaded_for_eval(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


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


def test_adapter_is_merged(tiny_model_dir, tmp_path, model_and_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # init_lora_weights=False: a non-zero update, so the adapter visibly changes the logits.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tokens = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        expected = peft_model.eval()(tokens).logits
    merged, _ = load_model_for_eval(tiny_model_dir, adapter_dir=tmp_path / "adapter", device="cpu")
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(tokens).logits
        plain = model_and_tokenizer[0](tokens).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


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
    assert s["per_subject"] == {"a": {"accuracy": 0.75, "n": 4}, "b": {"accuracy": 0.0, "n": 2}}
    assert s["per_category"] == {"STEM": {"accuracy": 0.75, "n": 4}, "other": {"accuracy": 0.0, "n": 2}}
    assert summarize_accuracy(preds.iloc[0:0])["accuracy"] is None


def test_compare_evaluations():
    base = {"accuracy": 0.5, "macro_accuracy": 0.4,
            "per_subject": {"a": {"accuracy": 0.5, "n": 4}, "b": {"accuracy": 0.25, "n": 4}},
            "per_category": {"STEM": {"accuracy": 0.5, "n": 8}}}
    tuned = {"accuracy": 0.625, "macro_accuracy": 0.5,
             "per_subject": {"a": {"accuracy": 0.75, "n": 4}, "c": {"accuracy": 1.0, "n": 1}},
             "per_category": {"STEM": {"accuracy": 0.625, "n": 8}}}
    cmp = compare_evaluations(base, tuned)
    assert cmp["accuracy_delta"] == pytest.approx(0.125)
    assert cmp["macro_accuracy_delta"] == pytest.approx(0.1)
    assert cmp["per_subject"] == {"a": {"base": 0.5, "tuned": 0.75, "delta": 0.25, "n": 4}}
    assert cmp["per_category"]["STEM"]["delta"] == pytest.approx(0.125)
    assert cmp["unmatched_subjects"] == ["b", "c"]


def test_heldout_loss_matches_manual(model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    rows = [
        ([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]),
        ([11, 12, 13], [-100, 12, 13]),
        ([20, 21, 22, 23, 24, 25, 26, 27], [-100] * 5 + [25, 26, 27]),
        ([30, 31], [-100, -100]),  # no supervised token: contributes nothing
    ]
    frame = pd.DataFrame({
        "id": [str(i) for i in range(len(rows))],
        "input_ids": [ids for ids, _ in rows],
        "attention_mask": [[1] * len(ids) for ids, _ in rows],
        "labels": [labels for _, labels in rows],
        "length": [len(ids) for ids, _ in rows],
    })
    path = tmp_path / "test.parquet"
    frame.to_parquet(path)

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:  # one sequence at a time: no padding involved
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    total -= float(logp[t - 1, labels[t]])
                    count += 1
    result = heldout_loss(model, path, batch_size=3)
    assert result["num_tokens"] == count == 8
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    empty = tmp_path / "empty.parquet"
    frame.iloc[0:0].to_parquet(empty)
    assert heldout_loss(model, empty) == {"loss": None, "perplexity": None, "num_tokens": 0}
