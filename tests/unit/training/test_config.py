"""TrainingConfig: validation names the field, JSON round trip, help and docs for every field, a light import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sft_pipeline.training import TrainingConfig
from tests.unit.training.helpers import REPO


@pytest.mark.parametrize(
    "override, field_name",
    [
        ({"method": "8bit"}, "method"),
        ({"method": "dpo"}, "method"),
        ({"batching": "zigzag"}, "batching"),
        ({"launcher": "slurm"}, "launcher"),
        ({"launcher": "python", "num_processes": 2}, "num_processes"),
        ({"launcher": "local", "num_processes": 2}, "num_processes"),
        ({"launcher": "torchrun", "accelerate_config_file": "fsdp.yaml"}, "accelerate_config_file"),
        ({"fsdp": True, "deepspeed": "zero3.json"}, "deepspeed"),
        ({"fsdp": "full_shard"}, "fsdp"),
        ({"fsdp_config": "fsdp.json"}, "fsdp_config"),
        ({"ray_resources_per_worker": {"CPU": -1}}, "ray_resources_per_worker"),
        ({"ray_max_failures": -1}, "ray_max_failures"),
        ({"use_gpu": "yes"}, "use_gpu"),
        ({"load_best_model_at_end": False, "early_stopping_patience": 2}, "early_stopping_patience"),
        ({"freeze_trainable_layers": 0}, "freeze_trainable_layers"),
        ({"save_steps": 0}, "save_steps"),
        ({"max_batch_tokens": -1}, "max_batch_tokens"),
        ({"max_batch_tokens": 1.5}, "max_batch_tokens"),
        ({"peak_tflops": -1.0}, "peak_tflops"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"lora_last_layers": -1}, "lora_last_layers"),
        ({"lora_last_layers": True}, "lora_last_layers"),
        ({"max_steps": 0, "num_train_epochs": 0.0}, "num_train_epochs"),
    ],
)
def test_bad_config_names_the_field(override, field_name, tmp_path):
    kw = dict(model_dir="m", dataset_dir="d", output_dir=str(tmp_path)) | override
    with pytest.raises(ValueError, match=field_name):
        TrainingConfig(**kw)


def test_config_json_roundtrip_and_unknown_field(tmp_path):
    cfg = TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", mlflow_tags={"a": "1"})
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert TrainingConfig.from_json(p) == cfg
    p.write_text(json.dumps(cfg.to_dict() | {"lerning_rate": 1e-3}))
    with pytest.raises(ValueError, match="lerning_rate"):
        TrainingConfig.from_json(p)
    assert set(TrainingConfig.help()) == {f for f in cfg.to_dict()} and all(TrainingConfig.help().values())


def test_import_needs_neither_mlflow_nor_dagster():
    """Importing and configuring pulls in neither mlflow/dagster (absent on a GPU box) nor torch (slow)."""
    code = ("import sys, sft_pipeline.training as t; t.TrainingConfig(model_dir='m', dataset_dir='d', output_dir='o');"
            "print(sorted(m for m in ('mlflow', 'dagster', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_docs_cover_every_field():
    text = (REPO / "docs" / "training.md").read_text()
    missing = [name for name in TrainingConfig.help() if f"`{name}`" not in text]
    assert not missing, f"docs/training.md does not describe {missing}"


def test_old_launcher_names_still_load():
    """Configs written before the launchers: 'python' is 'local'; 'accelerate' stays a launcher of its own."""
    assert TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", launcher="python").launcher == "local"
    assert TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o").launcher == "local"
    cfg = TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", launcher="accelerate", num_processes=4)
    assert cfg.launcher == "accelerate" and cfg.num_processes == 4
