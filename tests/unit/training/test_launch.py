"""launch_command: accelerate launch on CPU and several GPUs, plain python."""

from __future__ import annotations

import pytest

from sft_pipeline.training import TrainingConfig


def test_launch_command():
    from sft_pipeline.training import launch_command

    cfg = TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o")
    cmd = launch_command(cfg, "c.json", "r.json", python="py", cuda=False)
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "1" and "--cpu" in cmd
    assert cmd[-6:] == ["-m", "sft_pipeline.training", "--config", "c.json", "--output-json", "r.json"]
    gpu = launch_command(TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", num_processes=4),
                         "c.json", "r.json", cuda=True)
    assert "--multi_gpu" in gpu and "--cpu" not in gpu and gpu[gpu.index("--mixed_precision") + 1] == "bf16"
    plain = launch_command(TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", launcher="python"),
                           "c.json", "r.json", python="py")
    assert plain == ["py", "-m", "sft_pipeline.training", "--config", "c.json", "--output-json", "r.json"]
    with pytest.raises(ValueError, match="num_processes"):
        launch_command(TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", num_processes=2),
                       "c.json", "r.json", cuda=False)
