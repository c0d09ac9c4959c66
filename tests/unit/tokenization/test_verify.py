"""The round-trip checks (tokenization.verify): they pass on good data and catch each silent mis-training."""

import pandas as pd
import pytest

from sft_pipeline.schema import make_row
from sft_pipeline.tokenization import (
    CHECK_NAMES,
    IGNORE_INDEX,
    TokenizationConfig,
    build_sft_dataset,
    verify_sft_dataset,
)


def conversations(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i}: what is the capital of France?"},
                {"role": "assistant", "content": f"Paris is the capital of France ({i})."}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "Write a short poem about the sea."},
                     {"role": "assistant", "content": "The sea is wide and grey and calm."}]
        rows.append(make_row(msgs, source="unit"))
    return pd.DataFrame(rows)


def failed(outcomes) -> set[str]:
    return {name for name, outcome in outcomes.items() if not outcome.passed}


def tamper(path, row: int, fn) -> None:
    frame = pd.read_parquet(path)
    record = {k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v) for k, v in frame.iloc[row].items()}
    fn(record)
    record["length"] = len(record["input_ids"])
    frame.iloc[row] = pd.Series(record)
    frame.to_parquet(path, index=False)


@pytest.fixture
def built(tiny_model_dir, tmp_path):
    rows = conversations(30)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(validation_fraction=0, test_fraction=0))
    return rows, info


def test_checks_pass_on_a_built_dataset(built, tiny_model_dir):
    rows, info = built
    outcomes = verify_sft_dataset(info, tiny_model_dir, rows)
    assert set(outcomes) == set(CHECK_NAMES)
    assert failed(outcomes) == set()
    assert all(o.checked == 30 for o in outcomes.values())


def test_masked_row_fails_trainable_and_round_trip(built, tiny_model_dir):
    rows, info = built
    tamper(info.files["train"], 0, lambda r: r.update(labels=[IGNORE_INDEX] * len(r["labels"])))
    outcomes = verify_sft_dataset(info, tiny_model_dir, rows)
    assert {"every_example_trainable", "labels_round_trip", "eos_never_masked"} <= failed(outcomes)
    assert outcomes["every_example_trainable"].failures == 1
    assert outcomes["every_example_trainable"].examples[0]["id"] == pd.read_parquet(info.files["train"])["id"][0]


def test_masked_eos_fails(built, tiny_model_dir):
    from transformers import AutoTokenizer

    rows, info = built
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id

    def mask_eos(r):
        r["labels"] = [IGNORE_INDEX if x == eos else x for x in r["labels"]]

    tamper(info.files["train"], 1, mask_eos)
    outcomes = verify_sft_dataset(info, tiny_model_dir, rows)
    assert "eos_never_masked" in failed(outcomes) and "labels_round_trip" in failed(outcomes)
    assert outcomes["eos_never_masked"].failures == 1


def test_double_bos_fails(built, tiny_model_dir):
    from transformers import AutoTokenizer

    rows, info = built
    bos = AutoTokenizer.from_pretrained(tiny_model_dir).bos_token_id

    def double(r):
        r["input_ids"] = [bos] + r["input_ids"]
        r["labels"] = [IGNORE_INDEX] + r["labels"]
        r["attention_mask"] = [1] + r["attention_mask"]

    tamper(info.files["train"], 2, double)
    outcomes = verify_sft_dataset(info, tiny_model_dir, rows)
    assert failed(outcomes) == {"no_double_bos"}


def test_labels_on_the_prompt_fail_round_trip(built, tiny_model_dir):
    rows, info = built
    tamper(info.files["train"], 3, lambda r: r.update(labels=list(r["input_ids"])))  # trains on everything
    outcomes = verify_sft_dataset(info, tiny_model_dir, rows)
    assert "labels_round_trip" in failed(outcomes)
    example = outcomes["labels_round_trip"].examples[0]
    assert example["expected"] and example["got"]


def test_unknown_row_fails_round_trip(built, tiny_model_dir):
    rows, info = built
    outcomes = verify_sft_dataset(info, tiny_model_dir, rows.iloc[1:])
    assert outcomes["labels_round_trip"].failures == 1
    assert "not found" in outcomes["labels_round_trip"].examples[0]["detail"]


def test_truncated_rows_pass(tiny_model_dir, tmp_path):
    rows = conversations(30)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(max_length=40, truncation="truncate", validation_fraction=0, test_fraction=0))
    assert info.truncated > 0
    assert failed(verify_sft_dataset(info, tiny_model_dir, rows)) == set()


@pytest.mark.parametrize("template", ["alpaca", "llama2", "zephyr"])
def test_checks_pass_with_pad_equal_eos_and_a_bos_tokenizer(tiny_model_dir, tmp_path, template):
    from transformers import AutoTokenizer

    # pad == eos (as in SmolLM2) and a tokenizer that adds its own BOS on encode.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, bos_token="<|endoftext|>", add_bos_token=True)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "tok")
    rows = conversations(20)
    info = build_sft_dataset(rows, tmp_path / "tok", tmp_path / "ds",
                             TokenizationConfig(template=template, validation_fraction=0, test_fraction=0))
    assert info.bos_prefix == [tok.bos_token_id]
    outcomes = verify_sft_dataset(info, tmp_path / "tok", rows)
    assert failed(outcomes) == set()
    assert outcomes["eos_never_masked"].extra["pad_equals_eos"] is True
