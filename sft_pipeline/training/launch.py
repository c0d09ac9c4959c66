"""The command that starts training in its own process(es): `accelerate launch` or plain python."""

from __future__ import annotations

import sys
from pathlib import Path

from sft_pipeline.training.config import TrainingConfig


def launch_command(cfg: TrainingConfig, config_path: str | Path, result_path: str | Path,
                   python: str | None = None, cuda: bool | None = None) -> list[str]:
    """The command that runs this module on `config_path` in its own process(es).

    launcher 'accelerate': ``python -m accelerate.commands.launch --num_processes N [--cpu | --multi_gpu]
    --mixed_precision ... -m sft_pipeline.training ...``; 'python': ``python -m sft_pipeline.training ...``.
    """
    python = python or sys.executable
    module = ["-m", "sft_pipeline.training", "--config", str(config_path), "--output-json", str(result_path)]
    if cfg.launcher == "python":
        return [python, *module]
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and cfg.num_processes > 1:
        raise ValueError(f"TrainingConfig.num_processes: {cfg.num_processes} processes need CUDA GPUs; "
                         "this machine has none")
    precision = "bf16" if cuda and (cfg.bf16 is not False or cfg.method == "qlora") else "no"
    command = [python, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes),
               "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    if not cuda:
        command.append("--cpu")
    elif cfg.num_processes > 1:
        command.append("--multi_gpu")
    return [*command, *module]
