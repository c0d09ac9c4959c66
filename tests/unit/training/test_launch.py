"""launch_command: one process, torchrun, accelerate launch; ray_job_params: the Ray job that runs the same entry point."""

from __future__ import annotations

import pytest

from sft_pipeline.training import TrainingConfig, launch_command, ray_job_params

ENTRY = ["-m", "sft_pipeline.training", "--config", "c.json", "--output-json", "r.json"]


def _cfg(**kw) -> TrainingConfig:
    return TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", **kw)


def test_local_is_one_plain_process():
    assert launch_command(_cfg(), "c.json", "r.json", python="py") == ["py", *ENTRY]
    assert launch_command(_cfg(launcher="python"), "c.json", "r.json", python="py") == ["py", *ENTRY]


def test_torchrun_starts_num_processes_ranks_on_this_node():
    cpu = launch_command(_cfg(launcher="torchrun", num_processes=2), "c.json", "r.json", python="py", cuda=False)
    assert cpu == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2", *ENTRY]
    gpu = launch_command(_cfg(launcher="torchrun", num_processes=8), "c.json", "r.json", python="py", cuda=True)
    assert gpu[gpu.index("--nproc_per_node") + 1] == "8"
    with pytest.raises(ValueError, match="use_gpu"):
        launch_command(_cfg(launcher="torchrun", num_processes=2, use_gpu=True), "c.json", "r.json", cuda=False)


def test_accelerate_launch():
    cmd = launch_command(_cfg(launcher="accelerate"), "c.json", "r.json", python="py", cuda=False)
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "1" and "--cpu" in cmd and cmd[-6:] == ENTRY
    gpu = launch_command(_cfg(launcher="accelerate", num_processes=4), "c.json", "r.json", cuda=True)
    assert "--multi_gpu" in gpu and "--cpu" not in gpu and gpu[gpu.index("--mixed_precision") + 1] == "bf16"
    # accelerate launch --cpu starts one process whatever --num_processes says (huggingface/accelerate#2741)
    with pytest.raises(ValueError, match="num_processes.*torchrun"):
        launch_command(_cfg(launcher="accelerate", num_processes=2), "c.json", "r.json", cuda=False)
    # an accelerate config file (FSDP, DeepSpeed) decides the rest
    fsdp = launch_command(_cfg(launcher="accelerate", num_processes=8, accelerate_config_file="fsdp.yaml"),
                          "c.json", "r.json", python="py", cuda=True)
    assert fsdp == ["py", "-m", "accelerate.commands.launch", "--config_file", "fsdp.yaml", "--num_processes", "8", *ENTRY]


def test_ray_is_a_job_running_the_same_entry_point():
    cfg = _cfg(launcher="ray", num_processes=4)
    with pytest.raises(ValueError, match="Ray job"):
        launch_command(cfg, "c.json", "r.json")
    params = ray_job_params(cfg, "c.json", "r.json", env_vars={"PYTHONPATH": "/src"})
    assert params["entrypoint"] == "python " + " ".join(ENTRY)
    assert params["runtime_env"] == {"env_vars": {"PYTHONPATH": "/src"}}
    assert params["entrypoint_num_cpus"] == 0  # the driver only waits; the Ray Train workers hold the resources
