"""Data parallel under torchrun: 2 gloo ranks on a CPU train what one process trains on the same global batch.

Single process: `per_device_train_batch_size` 4. Two ranks: 2 each, so 4 rows per optimizer step. With
`batching: padded` both draw the same seeded permutation of the rows and accelerate deals the
per-rank batches of it round-robin (rank 0 rows 0-1, rank 1 rows 2-3 of each step), so each global
step sees the same 4 rows as the single process and the two runs are comparable step by step. (With
`length_grouped`, transformers builds its length mega-batches from the per-device batch size, so the
order differs by design; that mode is not compared here.)
"""

from __future__ import annotations

import json
import os
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
    replica_digests,
    train,
    weights_digest,
)
from tests.unit.training.helpers import STEP_LINE, subprocess_env



def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in a session of its own)."""
    import psutil

    try:
        family = [*psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def _cfg(model_dir, data_dir, out, **kw) -> TrainingConfig:
    base = dict(model_dir=str(model_dir), dataset_dir=str(data_dir), output_dir=str(out), max_steps=4, save_steps=2,
                learning_rate=1e-3, batching="padded", per_device_train_batch_size=4,
                bf16=False)  # fp32: one process and two ranks are compared to 1e-5
    return TrainingConfig(**{**base, **kw})


def _losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"] if "loss" in h]


def _run_torchrun(cfg: TrainingConfig, tmp_path: Path, name: str) -> tuple[dict, str]:
    cfg_path, result_path = tmp_path / f"{name}.json", tmp_path / f"{name}-result.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    command = launch_command(cfg, cfg_path, result_path)
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in command
    proc = subprocess.run(command, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads(result_path.read_text()), log


def test_weights_digest_is_of_the_trainable_weights():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    before = weights_digest(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # frozen: not part of the digest
    assert weights_digest(model) == before
    with torch.no_grad():
        model[1].bias.add_(1.0)
    assert weights_digest(model) != before
    assert replica_digests(model) is None  # one process: nothing to compare


@pytest.mark.slow
def test_two_torchrun_ranks_train_what_one_process_trains(tiny_model_dir, data_dir, tmp_path):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    single = train(_cfg(tiny_model_dir, data_dir, tmp_path / "single"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tiny_model_dir, data_dir, tmp_path / "dp2", launcher="torchrun", num_processes=2,
               per_device_train_batch_size=2, mlflow_tracking_uri=uri, mlflow_experiment="dp2")
    result, log = _run_torchrun(cfg, tmp_path, "dp2")

    # two ranks, in step: every rank ended with the same weights
    assert result["num_processes"] == 2 and result["launcher"] == "torchrun"
    digests = result["replica_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # the same global batch: the same rows per step, the same losses and the same weights as one process
    assert result["tokens_seen"] == single.tokens_seen
    assert _losses(result) == pytest.approx(_losses(single.to_dict()), rel=1e-5)
    ours = load_file(Path(result["adapter_dir"]) / "adapter_model.safetensors")
    theirs = load_file(Path(single.adapter_dir) / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5

    # only rank 0 writes: one adapter, one record, one MLflow run, one copy of each step line
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "fingerprint.json", "mlflow_run.json",
                                                     "training_record.json"]
    assert json.loads((out / "training_record.json").read_text())["weights_hash"] == result["weights_hash"]
    assert [int(m.group(1)) for m in STEP_LINE.finditer(log)] == [1, 2, 3, 4]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("dp2").experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "train_loss")) == [1, 2, 3, 4]
    # each rank keeps its own RNG state in a checkpoint (that is what resuming two ranks needs)
    assert {p.name for p in (out / CHECKPOINT_SUBDIR / "checkpoint-4").glob("rng_state_*.pth")} == \
        {"rng_state_0.pth", "rng_state_1.pth"}


@pytest.mark.slow
def test_two_torchrun_ranks_killed_midway_resume_from_the_last_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """SIGKILL torchrun and both ranks once a checkpoint exists; the rerun continues after it, in the same MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tiny_model_dir, data_dir, tmp_path / "out", launcher="torchrun", num_processes=2, max_steps=10,
               per_device_train_batch_size=2, save_total_limit=2, mlflow_tracking_uri=uri)
    cfg_path, result_path = tmp_path / "cfg.json", tmp_path / "result.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    command = launch_command(cfg, cfg_path, result_path)
    ckpts = tmp_path / "out" / CHECKPOINT_SUBDIR
    with (tmp_path / "first.log").open("w") as log1:
        first = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=log1, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            while last_complete_checkpoint(ckpts) is None:
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.02)
        finally:  # the launcher and both ranks die without any chance to clean up
            _kill_tree(first)
    killed_at = int(last_complete_checkpoint(ckpts).name.split("-")[1])
    assert killed_at < cfg.max_steps and not result_path.exists()

    second = subprocess.run(command, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    logged = [int(m.group(1)) for m in STEP_LINE.finditer(second.stdout + second.stderr)]
    result = json.loads(result_path.read_text())
    assert result["resumed_from_checkpoint"], (second.stdout + second.stderr)[-6000:]
    resumed_at = int(Path(result["resumed_from_checkpoint"]).name.split("-")[1])
    assert resumed_at >= killed_at
    assert logged == list(range(resumed_at + 1, cfg.max_steps + 1))  # rank 0 alone logs, from the step after
    assert result["global_step"] == cfg.max_steps and result["num_processes"] == 2
    assert [h["step"] for h in result["history"] if "loss" in h] == list(range(1, cfg.max_steps + 1))
    digests = result["replica_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow_experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]  # the resumed training continued its run
    assert runs[0].data.tags["sft_pipeline.resumed_from"] == f"checkpoint-{resumed_at}"
