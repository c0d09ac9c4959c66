"""Held-out loss against a manual computation, and scored generations."""

import math

import pandas as pd
import pytest
import torch

from sft_pipeline.evaluation.heldout import evaluate_generations, heldout_loss
from sft_pipeline.evaluation.answer_metrics import exact_match, rouge_l


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


def _conversation(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_generation_rows_take_kinds_from_categories_else_from_the_reference(tmp_path):
    from sft_pipeline.evaluation.heldout import generation_rows

    path = tmp_path / "test.parquet"
    pd.DataFrame({
        "id": ["g1", "c1", "u1", "u2"],
        "messages": [_conversation("Poem?", "The sea is wide and grey and calm."), _conversation("Spam?", "Spam. It promises a prize."),
                     _conversation("Sentiment?", "Positive."), _conversation("Story?", "Once upon a time there was a fox.")],
        "input_ids": [[1]] * 4,
    }).to_parquet(path)
    rows = generation_rows(path, {"c1": "classification", "g1": "creative_writing"}, limit=3)
    assert rows["id"].tolist() == ["c1", "g1", "u1"]  # first by id
    assert rows["kind"].tolist() == ["classification", "generative", "classification"]
    assert list(rows.columns) == ["id", "messages", "kind"]
    assert generation_rows(path, {}, limit=4)["kind"].tolist() == ["classification", "generative", "classification", "generative"]
    empty = generation_rows(path, {}, limit=0)
    assert len(empty) == 0 and list(empty.columns) == ["id", "messages", "kind"]


def test_read_row_categories(tmp_path):
    from sft_pipeline.evaluation.heldout import read_row_categories

    first, second, bad = tmp_path / "synthetic.parquet", tmp_path / "clean.parquet", tmp_path / "bad.parquet"
    pd.DataFrame({"id": ["a", "b", "c"], "category": ["open_qa", None, ""]}).to_parquet(first)
    pd.DataFrame({"id": ["a", "d"], "category": ["classification", "brainstorming"]}).to_parquet(second)
    pd.DataFrame({"id": ["e"]}).to_parquet(bad)
    got = read_row_categories([first, second, bad, tmp_path / "missing.parquet"])
    assert got == {"a": "classification", "d": "brainstorming"}


def test_side_by_side_generations():
    from sft_pipeline.evaluation.heldout import side_by_side_generations

    def gen(text, score):
        return pd.DataFrame({"id": ["r1"], "kind": ["generative"], "reference": ["ref"], "generation": [text],
                             "exact_match": [None], "f1": [None], "rouge_l": [score], "score": [score]})

    table = side_by_side_generations(gen("base", 0.1), gen("tuned", 0.9))
    assert table.loc[0, ["base_generation", "tuned_generation", "base_score", "tuned_score"]].tolist() == ["base", "tuned", 0.1, 0.9]
    assert list(table.columns[:3]) == ["id", "kind", "reference"] and "tuned_rouge_l" in table.columns
