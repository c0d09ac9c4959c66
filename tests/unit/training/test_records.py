"""Resume: a training process killed mid-run continues from its last checkpoint; the output folder is guarded."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
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
)
from tests.unit.training.helpers import STEP_LINE, subprocess_env



@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """Start `accelerate launch` training, SIGKILL the whole process group once a checkpoint exists, rerun."""
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data_dir), output_dir=str(tmp_path / "out"),
                         max_steps=10, save_steps=2, save_total_limit=2, learning_rate=1e-3,
                         per_device_train_batch_size=2, launcher="accelerate")
    cfg_path, result_path = tmp_path / "cfg.json", tmp_path / "result.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    command = launch_command(cfg, cfg_path, result_path)
    assert "accelerate.commands.launch" in command
    ckpts = tmp_path / "out" / CHECKPOINT_SUBDIR
    log1 = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=log1, stderr=subprocess.STDOUT,
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

    second = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
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
