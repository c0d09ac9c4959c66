"""bench/demo_task.py: its setting syntax and that it refuses to start without a finished demo."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "bench" / "demo_task.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_task_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_parse_as_json_values_with_a_name():
    bench = _load_script()
    assert bench.parse_setting("lr:learning_rate=0.003,lora_last_layers=6,bf16=false,batching=padded") == (
        "lr", {"learning_rate": 0.003, "lora_last_layers": 6, "bf16": False, "batching": "padded"})
    assert bench.parse_setting("default:") == ("default", {})
    with pytest.raises(ValueError, match="give it a name"):
        bench.parse_setting(":max_steps=3")


def test_the_baseline_is_the_old_demo_setup_and_trains_as_it_did():
    from sft_pipeline.training import TrainingConfig

    bench = _load_script()
    before = TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", **bench.SETTINGS[bench.BASELINE])
    assert (before.max_steps, before.learning_rate, before.lora_last_layers, before.bf16) == (40, 1e-3, 0, False)


def test_without_a_finished_demo_it_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--artifacts", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode != 0
    assert "run `make demo` first" in proc.stderr and str(tmp_path / "base_model") in proc.stderr
