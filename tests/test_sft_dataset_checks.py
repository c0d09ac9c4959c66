"""The blocking round-trip checks on sft_dataset: they pass on good data and catch each silent mis-training."""

import json

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline.definitions import build_definitions
from sft_pipeline.resources import MlflowTracking, PipelineStorage
from sft_pipeline.schema import make_row, write_rows
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


# --- in Dagster: the checks block training -------------------------------------------------------


@pytest.fixture
def staged(tmp_path, tiny_model_dir):
    """Storage holding what sft_dataset reads: clean + synthetic rows and a base_model manifest."""
    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    rows = conversations(40)
    write_rows(rows, storage.asset_dir("clean_instructions") / "rows.parquet")
    write_rows(rows.iloc[:0], storage.asset_dir("synthetic_instructions") / "rows.parquet")
    storage.write_manifest("base_model", {"path": str(tiny_model_dir)})
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registered_model_name="tiny_sft")
    return storage, tracking


def run_slice(storage, tracking, keys, sft_config, instance=None):
    defs = build_definitions(storage, tracking)
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in keys})
    run_config = {"ops": {"sft_dataset": {"config": sft_config}}}
    if "fine_tuned_model" in keys:
        run_config["ops"]["fine_tuned_model"] = {"config": {"max_steps": 1}}
    return job.execute_in_process(run_config=run_config, instance=instance or dg.DagsterInstance.ephemeral(),
                                  raise_on_error=False)


def test_asset_reports_checks_and_reuses_unchanged_inputs(staged):
    storage, tracking = staged
    instance = dg.DagsterInstance.ephemeral()
    first = run_slice(storage, tracking, ["sft_dataset"], {"max_length": 256}, instance)
    assert first.success
    evaluations = {e.check_name: e for e in first.get_asset_check_evaluations()}
    assert set(evaluations) == set(CHECK_NAMES) and all(e.passed for e in evaluations.values())
    meta = first.get_asset_materialization_events()[0].materialization.metadata
    assert meta["reused"].value is False and meta["path"].path.endswith(meta["fingerprint"].value)
    for key in ("trainable_token_share", "packing_efficiency", "truncated", "token_length_histogram", "template"):
        assert key in meta, key
    version = first.get_asset_materialization_events()[0].materialization.tags["dagster/data_version"]
    assert version == meta["content_hash"].value

    second = run_slice(storage, tracking, ["sft_dataset"], {"max_length": 256}, instance)
    again = second.get_asset_materialization_events()[0].materialization
    assert again.metadata["reused"].value is True
    assert again.tags["dagster/data_version"] == version

    third = run_slice(storage, tracking, ["sft_dataset"], {"max_length": 128}, instance)
    other = third.get_asset_materialization_events()[0].materialization.metadata
    assert other["reused"].value is False and other["fingerprint"].value != meta["fingerprint"].value
    assert json.loads((storage.asset_dir("sft_dataset") / "manifest.json").read_text())["max_length"] == 128


def test_failing_round_trip_blocks_training(staged, tmp_path):
    storage, tracking = staged
    # A template that rewrites the answer (upper case): the model would learn text that is not the data.
    shouting = tmp_path / "shouting.jinja"
    shouting.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}"
    )
    result = run_slice(storage, tracking, ["sft_dataset", "fine_tuned_model"], {"template": str(shouting)})
    assert not result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["labels_round_trip"].passed is False
    assert evaluations["every_example_trainable"].passed is True
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"sft_dataset"}
