"""sft_dataset in Dagster: its blocking round-trip checks pass on good data, stop training on bad data,
and an unchanged input is reused."""

import dagster as dg
import pytest

from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.tokenization import CHECK_NAMES
from tests.dagster.conftest import base_model_info, materialize_with_stubs, row_tables_info
from tests.unit.tokenization.test_verify import conversations
from sft_pipeline.outputs import CleanInstructionsInfo, SyntheticInstructionsInfo


@pytest.fixture
def staged(tmp_path, tiny_model_dir):
    """Hand-offs of what sft_dataset reads: clean + synthetic rows and the base model."""
    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    rows = conversations(40)
    stubs = {
        "clean_instructions": row_tables_info(CleanInstructionsInfo, storage, "clean_instructions", rows),
        "synthetic_instructions": row_tables_info(SyntheticInstructionsInfo, storage, "synthetic_instructions", rows.iloc[:0]),
        "base_model": base_model_info(tiny_model_dir),
    }
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registered_model_name="tiny_sft")
    return storage, tracking, stubs


def run_slice(staged, keys, sft_config, instance=None):
    storage, tracking, stubs = staged
    run_config = {"ops": {"sft_dataset": {"config": sft_config}}}
    if "fine_tuned_model" in keys:
        run_config["ops"]["fine_tuned_model"] = {"config": {"max_steps": 1}}
    return materialize_with_stubs(keys, stubs, storage, tracking, run_config, instance)


def test_asset_reports_checks_and_reuses_unchanged_inputs(staged):
    instance = dg.DagsterInstance.ephemeral()
    first = run_slice(staged, ["sft_dataset"], {"max_length": 256}, instance)
    assert first.success
    evaluations = {e.check_name: e for e in first.get_asset_check_evaluations()}
    assert set(evaluations) == set(CHECK_NAMES) and all(e.passed for e in evaluations.values())
    meta = first.asset_materializations_for_node("sft_dataset")[0].metadata
    assert meta["reused"].value is False and meta["path"].path.endswith(meta["fingerprint"].value)
    for key in ("trainable_token_share", "packing_efficiency", "truncated", "token_length_histogram", "template"):
        assert key in meta, key
    version = first.asset_materializations_for_node("sft_dataset")[0].tags["dagster/data_version"]
    assert version == meta["content_hash"].value

    second = run_slice(staged, ["sft_dataset"], {"max_length": 256}, instance)
    again = second.asset_materializations_for_node("sft_dataset")[0]
    assert again.metadata["reused"].value is True
    assert again.tags["dagster/data_version"] == version

    third = run_slice(staged, ["sft_dataset"], {"max_length": 128}, instance)
    other = third.asset_materializations_for_node("sft_dataset")[0].metadata
    assert other["reused"].value is False and other["fingerprint"].value != meta["fingerprint"].value
    assert third.output_for_node("sft_dataset").max_length == 128


def test_failing_round_trip_blocks_training(staged, tmp_path):
    # A template that rewrites the answer (upper case): the model would learn text that is not the data.
    shouting = tmp_path / "shouting.jinja"
    shouting.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
    )
    result = run_slice(staged, ["sft_dataset", "fine_tuned_model"], {"template": str(shouting)})
    assert not result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["labels_round_trip"].passed is False
    assert evaluations["every_example_trainable"].passed is True
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized - set(staged[2]) == {"sft_dataset"}


def test_truncated_split_is_rebuilt_on_rematerialization(staged):
    """`truncate -s 1500 train.parquet` in the published folder: the next materialization must not
    report "reused" over the damaged file; it rebuilds the same content and its checks pass."""
    import os

    instance = dg.DagsterInstance.ephemeral()
    first = run_slice(staged, ["sft_dataset"], {"max_length": 256}, instance)
    assert first.success
    recorded = first.asset_materializations_for_node("sft_dataset")[0]
    version = recorded.tags["dagster/data_version"]
    train = first.output_for_node("sft_dataset").files["train"]
    assert os.path.getsize(train) > 1500
    os.truncate(train, 1500)

    second = run_slice(staged, ["sft_dataset"], {"max_length": 256}, instance)
    assert second.success
    again = second.asset_materializations_for_node("sft_dataset")[0]
    assert again.metadata["reused"].value is False
    assert again.tags["dagster/data_version"] == version == recorded.metadata["content_hash"].value
    assert os.path.getsize(train) > 1500
    evaluations = {e.check_name: e for e in second.get_asset_check_evaluations()}
    assert set(evaluations) == set(CHECK_NAMES) and all(e.passed for e in evaluations.values())
