"""Held-out loss against a manual computation, and scored generations."""

import math

import pandas as pd
import pytest
import torch

from sft_pipeline.evaluation.heldout import evaluate_generations, heldout_loss
from sft_pipeline.evaluation.answer_metrics import exact_match, rouge_l, structured_scores


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
    assert result["num_rows"] == 3

    empty = tmp_path / "empty.parquet"
    frame.iloc[0:0].to_parquet(empty)
    assert heldout_loss(model, empty) == {"loss": None, "perplexity": None, "num_tokens": 0}


def test_heldout_loss_projects_only_the_scored_positions(model_and_tokenizer, tmp_path, monkeypatch):
    """logits_to_keep: the LM head sees only positions that predict a label, and the loss is the full-logits loss."""
    from sft_pipeline.evaluation import heldout

    model, _ = model_and_tokenizer
    rows = [([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]), ([11, 12, 13], [-100, 12, 13]),
            ([20, 21, 22, 23, 24, 25, 26, 27], [-100] * 5 + [25, 26, 27])]
    path = tmp_path / "test.parquet"
    pd.DataFrame({"input_ids": [i for i, _ in rows], "attention_mask": [[1] * len(i) for i, _ in rows],
                  "labels": [lab for _, lab in rows]}).to_parquet(path)
    projected = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: projected.append(args[0].shape[:-1].numel()))
    try:
        kept = heldout_loss(model, path, batch_size=3)
        monkeypatch.setattr(heldout, "forward_params", lambda m: {"input_ids", "attention_mask", "use_cache"})
        full = heldout_loss(model, path, batch_size=3)
    finally:
        handle.remove()
    assert projected == [8, 3 * 8]  # the 8 scored positions, then every position of the padded batch
    assert kept["loss"] == pytest.approx(full["loss"], abs=1e-6) and kept["num_tokens"] == full["num_tokens"] == 8



def test_evaluate_generations_scores_each_row(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ticket = '{"queue": "billing", "urgency": "high"}'
    rows = pd.DataFrame({
        "id": ["r1", "r2", "r3"],
        "messages": [[{"role": "user", "content": "Classify: spam?"}, {"role": "assistant", "content": "Spam."}],
                     [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "The sea is wide."}],
                     [{"role": "user", "content": "Triage: I was charged twice!"}, {"role": "assistant", "content": ticket}]],
        "category": ["classification", "creative_writing", "ticket_triage"],
        "kind": ["classification", "generative", "structured"],
    })
    out = evaluate_generations(model, tokenizer, rows, max_new_tokens=4, batch_size=2)
    assert out["id"].tolist() == ["r1", "r2", "r3"] and out["reference"].tolist() == ["Spam.", "The sea is wide.", ticket]
    assert out["category"].tolist() == ["classification", "creative_writing", "ticket_triage"]
    assert out.loc[0, "score"] == out.loc[0, "exact_match"] == exact_match(out.loc[0, "generation"], "Spam.")
    assert out.loc[1, "score"] == out.loc[1, "rouge_l"] == rouge_l(out.loc[1, "generation"], "The sea is wide.")
    assert out.loc[2, ["valid", "field_accuracy", "exact_match"]].tolist() == list(structured_scores(out.loc[2, "generation"], ticket).values())
    assert out.loc[2, "score"] == out.loc[2, "exact_match"] and pd.isna(out.loc[2, "rouge_l"])


def test_short_answers_get_a_token_budget_sized_to_their_references(model_and_tokenizer):
    from sft_pipeline.evaluation.heldout import answer_token_budget

    _, tokenizer = model_and_tokenizer
    refs = ['{"queue": "billing", "urgency": "high"}', "Spam."]
    longest = max(len(tokenizer.encode(r, add_special_tokens=False)) for r in refs)
    assert answer_token_budget(tokenizer, refs, max_new_tokens=500) == longest + 16
    assert answer_token_budget(tokenizer, refs, max_new_tokens=5) == 5
    assert answer_token_budget(tokenizer, [], max_new_tokens=64) == 16


def test_generation_limit():
    from sft_pipeline.evaluation.heldout import MAX_GENERATION_ROWS, generation_limit

    assert generation_limit(0) == MAX_GENERATION_ROWS and generation_limit(0, 120) == 120
    assert generation_limit(16) == 16 and generation_limit(-1) == 0


def _conversation(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_generation_rows_take_kinds_from_categories_else_from_the_reference(tmp_path):
    from sft_pipeline.evaluation.heldout import generation_rows

    path = tmp_path / "test.parquet"
    pd.DataFrame({
        "id": ["g1", "c1", "u1", "u2", "t1", "t2", "u3"],
        "messages": [_conversation("Poem?", "The sea is wide and grey and calm."), _conversation("Spam?", "Spam. It promises a prize."),
                     _conversation("Sentiment?", "Positive."), _conversation("Story?", "Once upon a time there was a fox."),
                     _conversation("Triage: refund please", '{"queue": "refund", "urgency": "low"}'),
                     _conversation("Triage: site down", '{"queue": "technical", "urgency": "high"}'),
                     _conversation("JSON?", '{"a": 1}')],
        "input_ids": [[1]] * 7,
    }).to_parquet(path)
    categories = {"c1": "classification", "g1": "creative_writing", "t1": "ticket_triage", "t2": "ticket_triage"}
    rows = generation_rows(path, categories, limit=3)
    assert rows["id"].tolist() == ["c1", "g1", "t1"]  # first by id
    assert rows["kind"].tolist() == ["classification", "generative", "structured"]
    assert rows["category"].tolist() == ["classification", "creative_writing", "ticket_triage"]
    assert list(rows.columns) == ["id", "messages", "category", "kind"]
    everything = generation_rows(path, categories, limit=100)
    assert everything["id"].tolist() == ["c1", "g1", "t1", "t2", "u1", "u2", "u3"]
    assert everything["kind"].tolist() == ["classification", "generative", "structured", "structured", "classification",
                                           "generative", "structured"]
    assert generation_rows(path, {}, limit=4)["kind"].tolist() == ["classification", "generative", "structured", "structured"]
    empty = generation_rows(path, {}, limit=0)
    assert len(empty) == 0 and list(empty.columns) == ["id", "messages", "category", "kind"]


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
        return pd.DataFrame({"id": ["r1"], "category": ["ticket_triage"], "kind": ["structured"], "reference": ["ref"],
                             "generation": [text], "valid": [1.0], "field_accuracy": [score], "exact_match": [score],
                             "f1": [None], "rouge_l": [None], "score": [score]})

    table = side_by_side_generations(gen("base", 0.0), gen("tuned", 1.0))
    assert table.loc[0, ["base_generation", "tuned_generation", "base_score", "tuned_score"]].tolist() == ["base", "tuned", 0.0, 1.0]
    assert list(table.columns[:4]) == ["id", "category", "kind", "reference"]
    assert {"tuned_valid", "base_field_accuracy", "tuned_exact_match", "tuned_rouge_l"} <= set(table.columns)
