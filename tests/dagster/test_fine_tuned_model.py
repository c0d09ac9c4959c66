"""fine_tuned_model through Dagster Pipes: trains, reuses a finished run, surfaces the child's error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.hashing import model_digest
from sft_pipeline.tokenization import SftDatasetInfo
from tests.dagster.conftest import base_model_info, materialize_with_stubs
from tests.unit.training.helpers import write_tiny_sft_dataset


def _stubs(tiny_model_dir, data_dir):
    dataset = SftDatasetInfo(path=str(data_dir), splits={}, files={}, num_tokens=0, trainable_tokens=0, truncated=0, dropped=0,
                             max_length=0, template_name="tokenizer", content_hash="tiny-data")
    return {"base_model": base_model_info(tiny_model_dir), "sft_dataset": dataset}


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory):
    return write_tiny_sft_dataset(tiny_model_dir, tmp_path_factory.mktemp("resume_data"), n_train=16, n_val=0, n_test=0)


@pytest.mark.slow
def test_asset_trains_through_pipes_and_rematerialization_reuses(tiny_model_dir, data_dir, tmp_path):
    import dagster as dg

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"fine_tuned_model": {"config": {"max_steps": 3, "save_steps": 2, "learning_rate": 1e-3}}}}

    def materialize():
        result = materialize_with_stubs(["fine_tuned_model"], _stubs(tiny_model_dir, data_dir), storage, tracking, run_config,
                                        instance, raise_on_error=True)
        assert result.success
        return result, result.asset_materializations_for_node("fine_tuned_model")[0]

    result, mat = materialize()
    meta = mat.metadata
    weights = Path(meta["path"].path)
    assert (weights / "adapter_model.safetensors").is_file()
    assert mat.tags["dagster/data_version"] == model_digest(weights)
    assert meta["steps"].value == 3 and math.isfinite(meta["train_loss"].value)
    assert 0 < meta["trainable_share"].value < 1 and meta["tokens_seen"].value > 0
    assert meta["tokens_per_second"].value > 0 and meta["wall_time_s"].value > 0 and meta["peak_memory_mib"].value > 0
    assert meta["loss_curve"].value.startswith("![plot](data:image/png;base64,")
    assert meta["reused_finished_run"].value is False
    # the output folder is keyed by the training fingerprint, not by the Dagster run
    assert Path(meta["output_dir"].path).name == meta["training_fingerprint"].value
    # the child's step lines reached the Dagster run through Pipes
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("step 3/3" in m and "train_loss=" in m for m in messages)
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(meta["mlflow_run_id"].value)
    assert run.data.tags["dagster_run_id"] == result.run_id and run.data.tags["dagster_code_version"]
    assert result.output_for_node("fine_tuned_model").adapter_dir == str(weights)

    second, mat2 = materialize()
    assert second.run_id != result.run_id
    assert mat2.metadata["reused_finished_run"].value is True
    assert mat2.tags["dagster/data_version"] == mat.tags["dagster/data_version"]
    assert mat2.metadata["path"].path == str(weights)


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU error")
def test_asset_surfaces_the_training_processs_error(tiny_model_dir, data_dir, tmp_path):
    """QLoRA on a CPU: the step fails with the child's one-line reason, not just 'exit code 1'."""
    import dagster as dg

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    result = materialize_with_stubs(
        ["fine_tuned_model"], _stubs(tiny_model_dir, data_dir), storage, MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"),
        {"ops": {"fine_tuned_model": {"config": {"method": "qlora", "max_steps": 2}}}},
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = failure.step_failure_data.error.to_string()
    assert "training failed: RuntimeError: TrainingConfig.method: 'qlora'" in text and "CUDA GPU" in text
