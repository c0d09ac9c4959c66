"""TrainingConfig: every setting of one training run, each field with its help (TRL-style), and its validation."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_METHODS = ("lora", "qlora", "full", "freeze")
# Named so a user asking for it gets "not yet" rather than "unknown".
PLANNED_METHODS = ("8bit",)
BATCHING_MODES = ("auto", "length_grouped", "padded", "padding_free", "packed")
# How training is started (launch.py): one local process, torchrun on one node, a Ray job across a cluster,
# or `accelerate launch` (kept for an accelerate config file). 'python' is the old name of 'local'.
LAUNCHERS = ("local", "torchrun", "ray", "accelerate")
LAUNCHER_ALIASES = {"python": "local"}
# transformers' SchedulerType values (the ones that need no extra kwargs); listed here rather
# than imported so building a config does not import torch (seconds) in the Dagster process.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


@dataclass
class TrainingConfig:
    """Everything one training run needs; JSON-serializable so the CLI and Dagster share it."""

    model_dir: str = field(metadata={"help": "Local Hugging Face folder of the base model and tokenizer."})
    dataset_dir: str = field(
        metadata={"help": "Folder holding train.parquet (and validation.parquet) from the tokenization stage."}
    )
    output_dir: str = field(
        metadata={"help": "Where checkpoints, the adapter/model and training_record.json are written."}
    )
    method: str = field(
        default="lora",
        metadata={"help": "Fine-tuning method: 'lora' (adapter on a frozen base), 'qlora' (adapter on a 4-bit NF4 "
                          "base; CUDA only), 'full' (all weights) or 'freeze' (only the last `freeze_trainable_layers` "
                          "blocks)."},
    )
    max_steps: int = field(
        default=120,
        metadata={"help": "Optimizer steps to run; <= 0 means train for `num_train_epochs` instead. The default trains "
                          "the demo's LoRA on 480 rows (about one epoch of its ticket-triage rows) on a CPU."},
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs to run when `max_steps` <= 0."})
    learning_rate: float = field(
        default=2e-3,
        metadata={"help": "Peak AdamW learning rate. The default is sized for the demo's 120 LoRA steps on a CPU "
                          "(docs/training.md: after the same steps 1e-3 got 36% of the held-out tickets right, "
                          "2e-3 49%); for runs of hundreds of steps use 1e-4..3e-4 for LoRA, ~2e-5 for full."},
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name: cosine, linear, constant, ..."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps for linear warmup, in [0, 1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (lora and qlora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (effective scale alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA branch. Above 0 every adapted layer keeps a dropped copy of its input "
                          "and the mask for the backward pass (on SmolLM2-135M about a third of a step's activation "
                          "memory)."},
    )
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "Modules to adapt: 'all-linear' or a list of module names (e.g. ['q_proj', 'v_proj'])."},
    )
    lora_last_layers: int = field(
        default=10,
        metadata={"help": "lora and qlora: adapt only the last this many transformer blocks; 0 (or more than the "
                          "model has) adapts every block. The backward pass stops at the lowest adapted block, so a "
                          "step costs less (measured on the demo in docs/training.md). The default is sized for the "
                          "demo's CPU budget; 0 is the usual choice when compute allows."},
    )
    freeze_trainable_layers: int = field(
        default=2,
        metadata={"help": "method 'freeze': how many of the last transformer blocks to train (plus the final norm); "
                          "everything else, embeddings included, stays frozen."},
    )
    batching: str = field(
        default="auto",
        metadata={"help": "'length_grouped' (padded micro-batches of rows of similar length: transformers' "
                          "LengthGroupedSampler), 'padded' (rows in random order, each micro-batch padded to its "
                          "longest row), 'padding_free' (concatenate the rows of a micro-batch with position_ids, no "
                          "pad tokens), 'packed' (best-fit-decreasing packing into rows of `packing_length` tokens, "
                          "padding-free) or 'auto' (padding_free on CUDA, where FlashAttention's varlen kernel or flex "
                          "attention runs; else length_grouped)."},
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Padded micro-batches ('length_grouped', 'padded') are run as row groups of similar length, "
                          "each cut to its longest row and at most this many tokens (rows x longest row; a longer "
                          "row goes alone), their gradients accumulated within the same optimizer step: the same "
                          "update with bounded activation memory and fewer pad tokens. "
                          "0 runs every micro-batch whole; None = 768 on CPU, 0 on a GPU."},
    )
    packing_length: int = field(
        default=2048, metadata={"help": "batching 'packed': tokens per packed row (longer rows are truncated)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel passed to from_pretrained ('sdpa', 'eager', 'flash_attention_2', ...); "
                          "None = on CUDA flash_attention_2 when flash-attn is installed and batching is not 'padded', else "
                          "flex_attention for padding_free and packed batches; else sdpa."},
    )
    use_liger_kernel: bool = field(
        default=False, metadata={"help": "Patch the model with Liger Triton kernels (CUDA and liger-kernel needed)."}
    )
    eval_steps: int = field(
        default=60, metadata={"help": "Evaluate on the validation split every this many steps (if it has rows)."}
    )
    save_steps: int | None = field(
        default=None,
        metadata={"help": "Write a resumable checkpoint every this many steps (and at the last step); None = every "
                          "eval_steps. With a validation split and load_best_model_at_end it must be a multiple of "
                          "eval_steps."},
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "Checkpoints kept on disk (the best one is never deleted); 0 keeps all."}
    )
    load_best_model_at_end: bool = field(
        default=True,
        metadata={"help": "With a validation split, finish with the checkpoint of lowest validation loss instead of "
                          "the last weights."},
    )
    early_stopping_patience: int = field(
        default=3,
        metadata={"help": "Stop after this many evaluations without a validation-loss improvement; 0 disables. "
                          "Needs a validation split and load_best_model_at_end."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Minimum validation-loss decrease that counts as an improvement."}
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Resume from the last complete checkpoint in output_dir (or reuse a finished run) when it "
                          "was made with the same configuration, data and base model; false starts over."},
    )
    logging_steps: int = field(default=1, metadata={"help": "Log train loss and learning rate every this many steps."})
    seed: int = field(default=42, metadata={"help": "Seed for model init of adapters, data order and dropout."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory (slower)."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (LoRA also keeps the frozen base in bf16). None = on where the hardware "
                          "multiplies bf16 natively: bf16-capable CUDA GPUs, and CPUs with AVX512-BF16 or AMX "
                          "(torch.cpu reports them); fp32 elsewhere. true on hardware without it is an error."},
    )
    launcher: str = field(
        default="local",
        metadata={"help": "How training starts: 'local' (one process), 'torchrun' (`num_processes` processes on this "
                          "node: NCCL on GPUs, gloo on CPU), 'ray' (a Ray job whose Ray Train TorchTrainer runs "
                          "`num_processes` workers across the cluster at `ray_address`) or 'accelerate' (accelerate "
                          "launch, with `accelerate_config_file`). See docs/scaling.md."},
    )
    num_processes: int = field(
        default=1,
        metadata={"help": "Data-parallel processes (ranks): torchrun/accelerate processes on this node, or Ray Train "
                          "workers; `per_device_train_batch_size` is per process. 'local' needs 1."},
    )
    use_gpu: bool | None = field(
        default=None,
        metadata={"help": "One GPU per process; None = yes where CUDA GPUs are visible (torchrun, accelerate) or the "
                          "Ray cluster has at least `num_processes` GPUs (ray)."},
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "launcher 'ray': the Ray dashboard address jobs are submitted to (e.g. "
                          "http://raycluster-head-svc:8265); None = env RAY_ADDRESS, else a local Ray cluster."},
    )
    ray_resources_per_worker: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "launcher 'ray': resources of each Ray Train worker (e.g. {'CPU': 8, 'GPU': 1}); empty = "
                          "Ray Train's default (1 CPU, or 1 GPU with use_gpu)."},
    )
    ray_storage_path: str | None = field(
        default=None,
        metadata={"help": "launcher 'ray': Ray Train's storage_path (a shared folder or s3://, gs://); None = "
                          "<output_dir>/ray."},
    )
    ray_max_failures: int = field(
        default=0,
        metadata={"help": "launcher 'ray': times Ray Train restarts a failed worker group; each restart resumes "
                          "from the last checkpoint in output_dir."},
    )
    check_shared_storage: bool = field(
        default=True,
        metadata={"help": "launcher 'ray' on a cluster of several nodes: refuse model, dataset, output and storage "
                          "paths on a machine-local filesystem and a SQLite/file MLflow store; false skips the check "
                          "(paths mounted on every node by other means)."},
    )
    accelerate_config_file: str | None = field(
        default=None,
        metadata={"help": "launcher 'accelerate': an accelerate config file (FSDP, DeepSpeed, ...) passed as "
                          "`accelerate launch --config_file`."},
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "Shard parameters, gradients and optimizer state with PyTorch FSDP (FSDP2 unless "
                          "`fsdp_config` says version 1), through the trainer under every launcher; needs CUDA GPUs "
                          "(accelerate runs FSDP on GPU ranks only)."},
    )
    fsdp_config: str | None = field(
        default=None,
        metadata={"help": "A JSON file of transformers' `fsdp_config` (version, reshard_after_forward, cpu_offload, "
                          "auto_wrap_policy, transformer_layer_cls_to_wrap, state_dict_type, activation_checkpointing, "
                          "...); None = transformers' defaults."},
    )
    deepspeed: str | None = field(
        default=None,
        metadata={"help": "A DeepSpeed JSON config (e.g. ZeRO-3) for the trainer, under any launcher; needs "
                          "`pip install deepspeed` and GPUs."},
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Peak dense bf16 TFLOP/s of one GPU for MFU; None = looked up from the device name."},
    )
    mlflow_tracking_uri: str | None = field(
        default=None, metadata={"help": "MLflow tracking URI (e.g. sqlite:////abs/mlflow.db); None = no tracking."}
    )
    mlflow_experiment: str = field(default="sft_pipeline", metadata={"help": "MLflow experiment name."})
    mlflow_run_name: str | None = field(default=None, metadata={"help": "MLflow run name; None lets MLflow pick."})
    mlflow_tags: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Tags set on the MLflow run (e.g. dagster_run_id)."}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field; paths are checked later, in `train`."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainingConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("model_dir", "dataset_dir", "output_dir"):
            if not isinstance(getattr(self, name), (str, Path)) or not str(getattr(self, name)).strip():
                raise bad(name, "must be a non-empty path")
            setattr(self, name, str(getattr(self, name)))
        if self.method in PLANNED_METHODS:
            raise bad("method", f"'{self.method}' is not implemented yet; use one of {list(SUPPORTED_METHODS)}")
        if self.method not in SUPPORTED_METHODS:
            raise bad("method", f"must be one of {list(SUPPORTED_METHODS)}")
        ints_pos = ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "eval_steps",
                    "logging_steps", "freeze_trainable_layers", "packing_length", "num_processes")
        for name in ints_pos:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be an integer >= 1")
        if self.max_batch_tokens is not None and (
            isinstance(self.max_batch_tokens, bool) or not isinstance(self.max_batch_tokens, int)
            or self.max_batch_tokens < 0
        ):
            raise bad("max_batch_tokens", "must be an integer >= 0 or null")
        if self.save_steps is not None and (
            isinstance(self.save_steps, bool) or not isinstance(self.save_steps, int) or self.save_steps < 1
        ):
            raise bad("save_steps", "must be an integer >= 1 or null")
        for name in ("max_steps", "seed", "lora_alpha", "save_total_limit", "early_stopping_patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be > 0")
        for name in ("save_total_limit", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("num_train_epochs", "learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm",
                     "lora_dropout", "early_stopping_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise bad("num_train_epochs", "must be > 0 when max_steps <= 0")
        if self.learning_rate <= 0:
            raise bad("learning_rate", "must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be >= 0")
        if isinstance(self.lora_last_layers, bool) or not isinstance(self.lora_last_layers, int) \
                or self.lora_last_layers < 0:
            raise bad("lora_last_layers", "must be an integer >= 0 (0 adapts every transformer block)")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.early_stopping_threshold < 0:
            raise bad("early_stopping_threshold", "must be >= 0")
        t = self.lora_target_modules
        if not (isinstance(t, str) and t) and not (
            isinstance(t, (list, tuple)) and t and all(isinstance(m, str) and m for m in t)
        ):
            raise bad("lora_target_modules", "must be 'all-linear' or a non-empty list of module names")
        if isinstance(t, tuple):
            self.lora_target_modules = list(t)
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise bad("lr_scheduler_type", f"must be one of {list(LR_SCHEDULERS)}")
        if self.batching not in BATCHING_MODES:
            raise bad("batching", f"must be one of {list(BATCHING_MODES)}")
        self.launcher = LAUNCHER_ALIASES.get(self.launcher, self.launcher)
        if self.launcher not in LAUNCHERS:
            raise bad("launcher", f"must be one of {list(LAUNCHERS)}")
        if self.launcher == "local" and self.num_processes != 1:
            raise bad("num_processes", "must be 1 with launcher 'local'; use launcher 'torchrun' (one node) or "
                                       "'ray' (a cluster) for several")
        if self.use_gpu is not None and not isinstance(self.use_gpu, bool):
            raise bad("use_gpu", "must be true, false or null")
        if isinstance(self.ray_max_failures, bool) or not isinstance(self.ray_max_failures, int) \
                or self.ray_max_failures < 0:
            raise bad("ray_max_failures", "must be an integer >= 0")
        if not isinstance(self.ray_resources_per_worker, dict) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0
            for k, v in self.ray_resources_per_worker.items()
        ):
            raise bad("ray_resources_per_worker", "must map resource names to non-negative numbers")
        self.ray_resources_per_worker = {k: float(v) for k, v in self.ray_resources_per_worker.items()}
        for name in ("ray_address", "ray_storage_path", "accelerate_config_file", "fsdp_config", "deepspeed"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v.strip()):
                raise bad(name, "must be a non-empty string or null")
        if not isinstance(self.fsdp, bool):
            raise bad("fsdp", "must be true or false (FSDP options go in fsdp_config)")
        if self.accelerate_config_file is not None and self.launcher != "accelerate":
            raise bad("accelerate_config_file", "is read by `accelerate launch`: set launcher 'accelerate' (or use "
                                                "`fsdp`/`deepspeed`, which work under every launcher)")
        if self.fsdp and self.deepspeed:
            raise bad("deepspeed", "FSDP and DeepSpeed exclude each other; set one of `fsdp` and `deepspeed`")
        if self.fsdp_config is not None and not self.fsdp:
            raise bad("fsdp_config", "is read only with `fsdp: true`")
        if self.attn_implementation is not None and not (
            isinstance(self.attn_implementation, str) and self.attn_implementation.strip()
        ):
            raise bad("attn_implementation", "must be a kernel name or null")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise bad("bf16", "must be true, false or null")
        for name in ("gradient_checkpointing", "load_best_model_at_end", "resume", "use_liger_kernel",
                     "check_shared_storage"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise bad("early_stopping_patience", "needs load_best_model_at_end=true (or set it to 0)")
        if self.peak_tflops is not None and (
            isinstance(self.peak_tflops, bool) or not isinstance(self.peak_tflops, (int, float))
            or not self.peak_tflops > 0
        ):
            raise bad("peak_tflops", "must be a positive number or null")
        if self.mlflow_tracking_uri is not None and not (
            isinstance(self.mlflow_tracking_uri, str) and self.mlflow_tracking_uri.strip()
        ):
            raise bad("mlflow_tracking_uri", "must be a non-empty URI or null")
        if not isinstance(self.mlflow_experiment, str) or not self.mlflow_experiment.strip():
            raise bad("mlflow_experiment", "must be a non-empty string")
        if not isinstance(self.mlflow_tags, dict):
            raise bad("mlflow_tags", "must be a mapping of tag name to value")
        self.mlflow_tags = {str(k): str(v) for k, v in self.mlflow_tags.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build from a mapping; unknown keys are an error (a typo should not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainingConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = [n for n in ("model_dir", "dataset_dir", "output_dir") if n not in data]
        if missing:
            raise ValueError(f"TrainingConfig.{missing[0]}: required field is missing")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainingConfig:
        """Read a JSON object of field values."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"TrainingConfig: {path} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for CLI and Dagster config descriptions)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def markdown_table(cls) -> str:
        """Every field with its default and help, as a Markdown table (docs/training.md embeds it)."""
        rows = ["| field | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"`{json.dumps(f.default)}`"
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f"`{json.dumps(f.default_factory())}`"  # type: ignore[misc]
            else:
                default = "required"
            rows.append(f"| `{f.name}` | {default} | {f.metadata.get('help', '')} |")
        return "\n".join(rows)
