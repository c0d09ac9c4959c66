"""How training starts: the command for one process, torchrun or `accelerate launch`, or the Ray job to submit.

Every launcher runs the same entry point, ``python -m sft_pipeline.training --config ... --output-json ...``:
directly ('local'), once per rank ('torchrun', 'accelerate'), or as the entrypoint of a Ray job whose
driver starts Ray Train workers that each run :func:`sft_pipeline.training.train` ('ray', see ray_train.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sft_pipeline.training.config import TrainingConfig

ENTRY_MODULE = "sft_pipeline.training"


def _entry(config_path: str | Path, result_path: str | Path) -> list[str]:
    return ["-m", ENTRY_MODULE, "--config", str(config_path), "--output-json", str(result_path)]


def _local_gpus(cfg: TrainingConfig, cuda: bool | None) -> tuple[bool, int]:
    """(use GPUs, how many are visible) on this machine, honouring `use_gpu`."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
        count = torch.cuda.device_count() if cuda else 0
    else:
        count = cfg.num_processes if cuda else 0
    if cfg.use_gpu and not cuda:
        raise ValueError("TrainingConfig.use_gpu: true, but this machine has no CUDA GPU")
    return (cuda if cfg.use_gpu is None else cfg.use_gpu), count


def launch_command(cfg: TrainingConfig, config_path: str | Path, result_path: str | Path,
                   python: str | None = None, cuda: bool | None = None) -> list[str]:
    """The command that runs training on `config_path` in its own process(es) on this machine.

    - 'local': ``python -m sft_pipeline.training ...`` (one process);
    - 'torchrun': ``python -m torch.distributed.run --standalone --nproc_per_node N -m sft_pipeline.training ...``
      (N ranks: NCCL with one GPU each, gloo on a CPU);
    - 'accelerate': ``python -m accelerate.commands.launch [--config_file F] --num_processes N ...``;
    - 'ray' has no local command: the entry point is submitted as a Ray job (:func:`ray_job_params`).
    """
    python = python or sys.executable
    module = _entry(config_path, result_path)
    if cfg.launcher == "local":
        return [python, *module]
    if cfg.launcher == "ray":
        raise ValueError("TrainingConfig.launcher: 'ray' runs as a Ray job; submit ray_job_params(...) with "
                         "dagster-ray's PipesRayJobClient or `ray job submit` (docs/scaling.md)")
    gpu, visible = _local_gpus(cfg, cuda)
    if cfg.launcher == "torchrun":
        if gpu and visible < cfg.num_processes:
            raise ValueError(f"TrainingConfig.num_processes: {cfg.num_processes} torchrun ranks need as many CUDA GPUs "
                             f"and {visible} are visible; lower num_processes, or use_gpu: false for gloo CPU ranks")
        # --standalone: a rendezvous on a free local port, so several trainings on one node never collide.
        return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", str(cfg.num_processes), *module]
    if cfg.accelerate_config_file:  # the file decides the distributed type (FSDP, DeepSpeed, ...) and precision
        return [python, "-m", "accelerate.commands.launch", "--config_file", cfg.accelerate_config_file,
                "--num_processes", str(cfg.num_processes), *module]
    if not gpu and cfg.num_processes > 1:
        raise ValueError(f"TrainingConfig.num_processes: accelerate launch --cpu starts one process, not "
                         f"{cfg.num_processes} (huggingface/accelerate#2741); use launcher 'torchrun' for CPU ranks")
    if gpu and visible < cfg.num_processes:
        raise ValueError(f"TrainingConfig.num_processes: {cfg.num_processes} processes need as many CUDA GPUs; "
                         f"{visible} are visible")
    precision = "bf16" if gpu and (cfg.bf16 is not False or cfg.method == "qlora") else "no"
    command = [python, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes),
               "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    if not gpu:
        command.append("--cpu")
    elif cfg.num_processes > 1:
        command.append("--multi_gpu")
    return [*command, *module]


def ray_job_params(cfg: TrainingConfig, config_path: str | Path, result_path: str | Path,
                   env_vars: dict[str, str] | None = None, python: str = "python") -> dict[str, Any]:
    """`JobSubmissionClient.submit_job` parameters (what dagster-ray's `PipesRayJobClient` takes) for launcher 'ray'.

    The job's entrypoint is the usual entry point; seeing launcher 'ray', it becomes the Ray Train driver
    (ray_train.py), which needs no resources of its own (`entrypoint_num_cpus: 0`): the workers get them.
    The package must be importable on the cluster (installed in its image, or `PYTHONPATH` in `env_vars`
    pointing at a checkout every node mounts).
    """
    import shlex

    entrypoint = shlex.join([python, *_entry(config_path, result_path)])
    return {"entrypoint": entrypoint, "runtime_env": {"env_vars": dict(env_vars or {})}, "entrypoint_num_cpus": 0}
