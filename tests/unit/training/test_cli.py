"""`python -m sft_pipeline.training` in its own process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.unit.training.helpers import REPO, make_cfg


def test_cli_runs_in_subprocess(tiny_model_dir, tiny_dataset_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=2)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    result_path = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "sft_pipeline.training", "--config", str(cfg_path), "--output-json", str(result_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["global_step"] == 2 and math.isfinite(result["train_loss"])
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
