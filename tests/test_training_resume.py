"""Resume: a training process killed mid-run continues from its last checkpoint; the asset through Pipes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sft_pipeline.training import (
    CHECKPOINT_SUBDIR,
    TrainingConfig,
    last_complete_checkpoint,
    launch_command,
    train,
    training_fingerprint,
    weights_content_hash,
)
from tests.test_training import REPO, write_tiny_sft_dataset

STEP_LINE = re.compile(r"step (\d+)/(\d+) .*train_loss=")


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory):
    return write_tiny_sft_dataset(tiny_model_dir, tmp_path_factory.mktemp("resume_data"), n_train=16, n_val=0, n_test=0)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """Start `accelerate launch` training, SIGKILL the whole process group once a checkpoint exists, rerun."""
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data_dir), output_dir=str(tmp_path / "out"),
                         max_steps=10, save_steps=2, save_total_limit=2, learning_rate=1e-3,
                         per_device_train_batch_size=2)
    cfg_path, result_path = tmp_path / "cfg.json", tmp_path / "result.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    command = launch_command(cfg, cfg_path, result_path)
    assert "accelerate.commands.launch" in command
    ckpts = tmp_path / "out" / CHECKPOINT_SUBDIR
    log1 = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        while last_complete_checkpoint(ckpts) is None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.02)
    finally:  # training "dies": the launcher and its worker, without any chance to clean up
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log1.close()
    killed_at = int(last_complete_checkpoint(ckpts).name.split("-")[1])
    assert killed_at < cfg.max_steps and not result_path.exists()

    second = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    logged = [int(m.group(1)) for m in STEP_LINE.finditer(second.stdout + second.stderr)]
    assert logged, "the resumed run logged no step"
    result = json.loads(result_path.read_text())
    resumed_at = int(Path(result["resumed_from_checkpoint"]).name.split("-")[1])
    assert resumed_at >= killed_at
    assert logged[0] == resumed_at + 1 > killed_at  # no step before the checkpoint is trained again
    assert result["global_step"] == cfg.max_steps == logged[-1]
    # the history spans both processes: every step from 1 to max_steps has its loss
    assert [h["step"] for h in result["history"] if "loss" in h] == list(range(1, cfg.max_steps + 1))
    assert all(math.isfinite(h["loss"]) for h in result["history"] if "loss" in h)
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert len(list(ckpts.glob("checkpoint-*"))) <= cfg.save_total_limit

    # A third run of the same configuration finds the finished training and reuses it.
    again = train(cfg)
    assert again.reused and again.global_step == cfg.max_steps and again.weights_hash == result["weights_hash"]


def test_resume_continues_the_mlflow_run_and_guards_the_folder(tiny_model_dir, data_dir, tmp_path):
    """A process that died after checkpoint-2 (simulated by deleting what came later) resumes in the same MLflow run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data_dir), output_dir=str(out), max_steps=4,
                         save_steps=2, save_total_limit=0, learning_rate=1e-3, mlflow_tracking_uri=uri)
    first = train(cfg)
    assert first.resumed_from_checkpoint is None and first.global_step == 4
    shutil.rmtree(out / CHECKPOINT_SUBDIR / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    (out / "training_record.json").unlink()
    (out / CHECKPOINT_SUBDIR / "checkpoint-3").mkdir()  # a half-written checkpoint: no trainer_state.json

    second = train(cfg)
    assert second.resumed_from_checkpoint.endswith("checkpoint-2") and second.global_step == 4
    assert not (out / CHECKPOINT_SUBDIR / "checkpoint-3").exists()
    assert second.mlflow_run_id == first.mlflow_run_id
    # same data order and RNG state: the resumed steps retrace the original ones
    losses = lambda r: [h["loss"] for h in r.history if "loss" in h]  # noqa: E731
    assert losses(second) == pytest.approx(losses(first), rel=1e-4)
    assert second.weights_hash == first.weights_hash or losses(second)[-1] == pytest.approx(losses(first)[-1])
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sft_pipeline.resumed_from"] == "checkpoint-2"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {1, 2, 3, 4}

    # Another configuration must not pick up these checkpoints...
    other = TrainingConfig(**{**cfg.to_dict(), "learning_rate": 5e-4})
    assert training_fingerprint(other) != training_fingerprint(cfg)
    with pytest.raises(ValueError, match="output_dir"):
        train(other)
    # ...unless told to start over there.
    fresh = train(TrainingConfig(**{**other.to_dict(), "resume": False, "max_steps": 2, "save_steps": 2}))
    assert fresh.resumed_from_checkpoint is None and fresh.global_step == 2 and not fresh.reused
    assert fresh.mlflow_run_id != first.mlflow_run_id


@pytest.mark.slow
def test_asset_trains_through_pipes_and_rematerialization_reuses(tiny_model_dir, data_dir, tmp_path):
    import dagster as dg

    from sft_pipeline.assets.training import fine_tuned_model
    from sft_pipeline.resources import MlflowTracking, PipelineStorage

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    storage.write_manifest("base_model", {"path": str(tiny_model_dir)})
    storage.write_manifest("sft_dataset", {"path": str(data_dir)})
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"fine_tuned_model": {"config": {"max_steps": 3, "save_steps": 2, "learning_rate": 1e-3}}}}

    def materialize():
        result = dg.materialize([fine_tuned_model], resources={"storage": storage, "mlflow_tracking": tracking},
                                run_config=run_config, instance=instance)
        assert result.success
        (event,) = result.get_asset_materialization_events()
        return result, event.materialization

    result, mat = materialize()
    meta = mat.metadata
    weights = Path(meta["path"].path)
    assert (weights / "adapter_model.safetensors").is_file()
    assert mat.tags["dagster/data_version"] == weights_content_hash(weights)
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
    assert storage.read_manifest("fine_tuned_model")["adapter_dir"] == str(weights)

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

    from sft_pipeline.assets.training import fine_tuned_model
    from sft_pipeline.resources import MlflowTracking, PipelineStorage

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    storage.write_manifest("base_model", {"path": str(tiny_model_dir)})
    storage.write_manifest("sft_dataset", {"path": str(data_dir)})
    result = dg.materialize(
        [fine_tuned_model],
        resources={"storage": storage, "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")},
        run_config={"ops": {"fine_tuned_model": {"config": {"method": "qlora", "max_steps": 2}}}},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = failure.step_failure_data.error.to_string()
    assert "training failed: RuntimeError: TrainingConfig.method: 'qlora'" in text and "CUDA GPU" in text
