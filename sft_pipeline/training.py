"""Supervised fine-tuning (LoRA, QLoRA, full, freeze) on a pre-tokenized Parquet dataset.

Plain domain module: no Dagster import. It runs on a GPU box that has only
torch/transformers/peft/trl/accelerate/datasets/pandas/pyarrow; mlflow and dagster-pipes are
imported lazily and only when used. Runs by hand (``python -m sft_pipeline.training --config
cfg.json``), under ``accelerate launch`` (see :func:`launch_command`), or from the Dagster
asset through Dagster Pipes, all through :func:`train`.

Input: ``dataset_dir/{train,validation}.parquet`` with ``input_ids``, ``attention_mask``,
``labels`` (-100 on non-assistant tokens) and ``length``. The rows are used as they are: TRL's
``SFTTrainer`` treats a dataset with ``input_ids`` as pre-tokenized and keeps a ``labels``
column, so nothing is tokenized or templated twice and the loss stays on assistant tokens.

Resume: ``output_dir`` holds ``checkpoints/checkpoint-<step>`` every ``save_steps`` and a
``fingerprint.json``; a rerun with the same configuration, data and base model resumes from the
last complete checkpoint (or reuses a finished run) instead of starting over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_METHODS = ("lora", "qlora", "full", "freeze")
# Named so a user asking for it gets "not yet" rather than "unknown".
PLANNED_METHODS = ("8bit",)
BATCHING_MODES = ("auto", "padded", "padding_free", "packed")
LAUNCHERS = ("accelerate", "python")
# transformers' SchedulerType values (the ones that need no extra kwargs); listed here rather
# than imported so building a config does not import torch (seconds) in the Dagster process.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
RECORD_FILE = "training_record.json"
FINGERPRINT_FILE = "fingerprint.json"
MLFLOW_RUN_FILE = "mlflow_run.json"
CHECKPOINT_SUBDIR = "checkpoints"
ADAPTER_SUBDIR = "adapter"
FULL_MODEL_SUBDIR = "model"
# Fields that do not change what is trained: left out of the fingerprint that keys resume.
NON_TRAINING_FIELDS = ("output_dir", "mlflow_tracking_uri", "mlflow_experiment", "mlflow_run_name", "mlflow_tags",
                       "resume", "launcher", "logging_steps", "peak_tflops")
# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU; override with peak_tflops.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


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
        default=20, metadata={"help": "Optimizer steps to run; <= 0 means train for `num_train_epochs` instead."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs to run when `max_steps` <= 0."})
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Peak AdamW learning rate (1e-4..3e-4 for LoRA, ~2e-5 for full)."}
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
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "Modules to adapt: 'all-linear' or a list of module names (e.g. ['q_proj', 'v_proj'])."},
    )
    freeze_trainable_layers: int = field(
        default=2,
        metadata={"help": "method 'freeze': how many of the last transformer blocks to train (plus the final norm); "
                          "everything else, embeddings included, stays frozen."},
    )
    batching: str = field(
        default="auto",
        metadata={"help": "'padded' (pad each micro-batch to its longest row), 'padding_free' (concatenate the rows "
                          "of a micro-batch with position_ids, no pad tokens), 'packed' (best-fit-decreasing packing "
                          "into rows of `packing_length` tokens, padding-free) or 'auto' (padding_free where the "
                          "FlashAttention varlen kernel is available, i.e. CUDA with flash-attn installed; else padded)."},
    )
    packing_length: int = field(
        default=2048, metadata={"help": "batching 'packed': tokens per packed row (longer rows are truncated)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel passed to from_pretrained ('sdpa', 'eager', 'flash_attention_2', ...); "
                          "None = flash_attention_2 on CUDA when flash-attn is installed and batching is not 'padded', "
                          "else sdpa."},
    )
    use_liger_kernel: bool = field(
        default=False, metadata={"help": "Patch the model with Liger Triton kernels (CUDA and liger-kernel needed)."}
    )
    eval_steps: int = field(
        default=10, metadata={"help": "Evaluate on the validation split every this many steps (if it has rows)."}
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
        default=None, metadata={"help": "bf16 mixed precision; None = on for bf16-capable CUDA, off (fp32) on CPU."}
    )
    launcher: str = field(
        default="accelerate",
        metadata={"help": "How launch_command starts the training process: 'accelerate' (accelerate launch) or "
                          "'python' (plain python -m)."},
    )
    num_processes: int = field(
        default=1, metadata={"help": "Processes (GPUs) accelerate launch starts; > 1 needs as many CUDA GPUs."}
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
        if self.launcher not in LAUNCHERS:
            raise bad("launcher", f"must be one of {list(LAUNCHERS)}")
        if self.launcher == "python" and self.num_processes != 1:
            raise bad("num_processes", "must be 1 with launcher 'python'; use launcher 'accelerate' for several")
        if self.attn_implementation is not None and not (
            isinstance(self.attn_implementation, str) and self.attn_implementation.strip()
        ):
            raise bad("attn_implementation", "must be a kernel name or null")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise bad("bf16", "must be true, false or null")
        for name in ("gradient_checkpointing", "load_best_model_at_end", "resume", "use_liger_kernel"):
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


@dataclass
class TrainingResult:
    """What a run produced; written to ``output_dir/training_record.json`` with the config."""

    output_dir: str
    method: str
    adapter_dir: str | None  # set for lora / qlora
    model_dir: str | None  # set for full / freeze
    base_model_dir: str
    train_loss: float  # last logged training loss
    mean_train_loss: float  # mean of the logged training losses over the whole run (resumes included)
    eval_loss: float | None  # validation loss of the saved weights (the best checkpoint's when kept)
    history: list[dict[str, Any]]
    global_step: int
    trainable_parameters: int
    total_parameters: int
    train_rows: int
    validation_rows: int
    tokens_seen: int  # non-pad input tokens fed to the model during training (all processes, all resumes)
    train_runtime_s: float  # wall time of the training loop in this process
    tokens_per_second: float  # tokens trained in this process / train_runtime_s
    mlflow_run_id: str | None = None
    fingerprint: str = ""  # hash of (training fields, dataset content, base model) that keys resume
    weights_hash: str = ""  # content hash of the saved adapter/model folder (the Dagster data version)
    resumed_from_checkpoint: str | None = None
    reused: bool = False  # a finished run of the same fingerprint was found and returned as is
    early_stopped: bool = False
    best_checkpoint: str | None = None
    max_steps: int = 0  # the step budget the trainer had (after epochs were converted)
    peak_memory_mib: float | None = None  # CUDA: max allocated; CPU: peak resident set size of the process
    mfu: float | None = None  # model FLOPs utilization (GPU only)
    device: str = "cpu"
    batching: str = "padded"
    attn_implementation: str = "sdpa"
    num_processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def weights_dir(self) -> str:
        return self.adapter_dir or self.model_dir or ""

# --------------------------------------------------------------------------------------------
# fingerprints and content hashes (no torch needed)


def _hash_files(paths: list[Path], root: Path, digest, with_content: bool = True) -> None:
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if with_content:
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            st = path.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())


def dataset_content_hash(dataset_dir: str | Path) -> str:
    """sha256 of the train/validation Parquet bytes (what training reads)."""
    root = Path(dataset_dir)
    digest = hashlib.sha256()
    _hash_files([p for p in (root / "train.parquet", root / "validation.parquet") if p.is_file()], root, digest)
    return digest.hexdigest()


def model_identity_hash(model_dir: str | Path) -> str:
    """The base model's resolved path, config.json content and every file's size and mtime (cheap for big models)."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256(str(root).encode())
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    _hash_files(files, root, digest, with_content=False)
    if (root / "config.json").is_file():
        digest.update((root / "config.json").read_bytes())
    return digest.hexdigest()


def training_fingerprint(cfg: TrainingConfig) -> str:
    """Hash of everything that decides the trained weights: training fields, dataset bytes, base model.

    Output folder, tracking and launcher fields are left out, so a rerun of the same training under
    another Dagster run (or by hand) finds the same checkpoints.
    """
    fields = {k: v for k, v in cfg.to_dict().items() if k not in NON_TRAINING_FIELDS}
    payload = {"config": fields, "dataset": dataset_content_hash(cfg.dataset_dir),
               "model": model_identity_hash(cfg.model_dir)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_content_hash(weights_dir: str | Path) -> str:
    """sha256 over the saved adapter/model folder (relative names and bytes); the asset's data version."""
    root = Path(weights_dir)
    digest = hashlib.sha256()
    _hash_files([p for p in root.rglob("*") if p.is_file()], root, digest)
    return digest.hexdigest()[:32]


def last_complete_checkpoint(checkpoint_root: str | Path) -> Path | None:
    """The highest `checkpoint-<step>` folder whose trainer_state.json (written last) exists."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


# --------------------------------------------------------------------------------------------
# data


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def load_tokenized_splits(dataset_dir: str | Path) -> dict[str, Any]:
    """Load train (and non-empty validation) Parquet as `datasets.Dataset`s with input_ids + labels.

    Rows whose labels are all -100 are dropped: they carry no loss and a batch made only of
    them would divide by zero supervised tokens.
    """
    from accelerate import PartialState
    from datasets import load_dataset

    dataset_dir = Path(dataset_dir)
    files = {"train": dataset_dir / "train.parquet", "validation": dataset_dir / "validation.parquet"}
    if not files["train"].is_file():
        raise FileNotFoundError(f"TrainingConfig.dataset_dir: {files['train']} does not exist")
    present = {k: str(p) for k, p in files.items() if p.is_file() and _num_rows(p) > 0}
    if "train" not in present:
        raise ValueError(f"TrainingConfig.dataset_dir: {files['train']} has no rows")
    # Under `accelerate launch` the main process builds the datasets cache first; the others reuse it.
    with PartialState().main_process_first():
        return _prepare_splits(load_dataset("parquet", data_files=present), present, files)


def _prepare_splits(splits, present: dict[str, str], files: dict[str, Path]) -> dict[str, Any]:
    out = {}
    for name, ds in splits.items():
        missing = {"input_ids", "labels"} - set(ds.column_names)
        if missing:
            raise ValueError(f"{present[name]} lacks column(s) {sorted(missing)}")
        # Only what the model consumes; the collator rebuilds attention_mask / position_ids.
        ds = ds.select_columns(["input_ids", "labels"])
        bad = ds.filter(lambda r: len(r["input_ids"]) != len(r["labels"]))
        if len(bad):
            raise ValueError(f"{present[name]}: {len(bad)} row(s) where labels and input_ids differ in length")
        before = len(ds)
        ds = ds.filter(lambda r: any(x != -100 for x in r["labels"]))
        if len(ds) < before:
            logger.warning("%s: dropped %d row(s) with no supervised tokens", name, before - len(ds))
        out[name] = ds
    if len(out["train"]) == 0:
        raise ValueError(f"{files['train']}: no row has a supervised (non -100) label")
    if "validation" in out and len(out["validation"]) == 0:
        del out["validation"]
    return out


# --------------------------------------------------------------------------------------------
# MLflow (optional, imported lazily)


class _MlflowRun:
    """One MLflow run per training, driven through MlflowClient (never touches a caller's fluent run).

    The run id is remembered in ``output_dir/mlflow_run.json``; a resumed training continues the
    same run, so its metric history spans the interruption.
    """

    def __init__(self, cfg: TrainingConfig, fingerprint: str, resuming: bool):
        from mlflow import MlflowClient

        from sft_pipeline.registry import ensure_experiment

        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        self.resumed = False
        tags = {"sft_pipeline.stage": "training", "sft_pipeline.method": cfg.method,
                "sft_pipeline.training_fingerprint": fingerprint, **cfg.mlflow_tags}
        state_file = Path(cfg.output_dir) / MLFLOW_RUN_FILE
        run_id = self._previous_run(state_file, cfg.mlflow_tracking_uri) if resuming else None
        if run_id:
            self.run_id = run_id
            self.resumed = True
            self.client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        else:
            exp_id = ensure_experiment(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
            run = self.client.create_run(exp_id, run_name=cfg.mlflow_run_name, tags=tags)
            self.run_id = run.info.run_id
            state_file.write_text(json.dumps({"tracking_uri": cfg.mlflow_tracking_uri, "run_id": self.run_id}))
        params = {k: v for k, v in cfg.to_dict().items() if k not in ("mlflow_tags", "mlflow_run_name", "resume")}
        params["training_fingerprint"] = fingerprint
        self.log_params(params)

    def _previous_run(self, state_file: Path, uri: str) -> str | None:
        try:
            saved = json.loads(state_file.read_text())
            if saved.get("tracking_uri") != uri:
                return None
            run = self.client.get_run(saved["run_id"])
            return run.info.run_id if run.info.lifecycle_stage == "active" else None
        except Exception:  # no file, another store, a deleted run: start a new MLflow run
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # Params are immutable in MLflow: on resume log only the ones the run lacks.
        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        if items:
            self.client.log_batch(self.run_id, params=items, synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v) and math.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items, synchronous=True)

    def log_dataset_inputs(self, dataset_dir: str | Path, digest: str) -> None:
        """Record train/validation Parquet as mlflow.data dataset inputs (name, digest, source, schema)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        if self.resumed:
            return
        inputs = []
        for split in ("train", "validation"):
            path = Path(dataset_dir) / f"{split}.parquet"
            if not path.is_file() or _num_rows(path) == 0:
                continue
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            columns = [c for c in ("id", "length") if c in names] or ["input_ids"]
            frame = pd.read_parquet(path, columns=columns)
            with warnings.catch_warnings():  # mlflow's hints about int columns and source types are noise here
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=f"sft_dataset_{split}",
                                             digest=f"{digest[:8]}-{split}")
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def end(self, status: str, artifacts: list[Path] = ()) -> None:
        for path in artifacts:
            try:
                self.client.log_artifact(self.run_id, str(path))
            except Exception:  # an artifact store hiccup must not lose the trained model
                logger.exception("could not log %s to MLflow", path)
        self.client.set_terminated(self.run_id, status=status)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# HF log key -> MLflow metric name
_METRIC_KEYS = {"loss": "train_loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate",
                "grad_norm": "grad_norm"}


def peak_memory_mib() -> float:
    """CUDA: max allocated bytes on this device; CPU: the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _make_callback(mlflow_run: _MlflowRun | None):
    from transformers import TrainerCallback

    class _StepLogger(TrainerCallback):
        """Per-step metrics to the log (forwarded to Dagster under Pipes) and to MLflow, live."""

        def __init__(self):
            self.t_start = self.t_last = time.perf_counter()
            self.tokens_start = self.tokens_last = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_start = self.t_last = time.perf_counter()
            self.tokens_start = self.tokens_last = int(state.num_input_tokens_seen or 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {_METRIC_KEYS[k]: v for k, v in logs.items() if k in _METRIC_KEYS}
            if "loss" in logs:  # a training log: throughput since the previous one
                now, tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)
                if now > self.t_last and tokens > self.tokens_last:
                    metrics["tokens_per_second"] = (tokens - self.tokens_last) / (now - self.t_last)
                self.t_last, self.tokens_last = now, tokens
                metrics["tokens_seen"] = tokens
                metrics["peak_memory_mib"] = peak_memory_mib()
            if not metrics:
                return
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            logger.info("step %d/%d %s", state.global_step, state.max_steps, text)
            if mlflow_run is not None:
                mlflow_run.log_metrics(metrics, step=state.global_step)

    return _StepLogger()


# --------------------------------------------------------------------------------------------
# model


def _resolve_bf16(cfg: TrainingConfig) -> bool:
    import torch

    capable = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.bf16 is None:
        return capable
    if cfg.bf16 and not capable:
        raise ValueError("TrainingConfig.bf16: true needs a bf16-capable CUDA GPU; use null for auto")
    return cfg.bf16


def check_device_support(cfg: TrainingConfig) -> None:
    """Fail early, naming the field, for settings this machine cannot run (QLoRA, Liger, several GPUs on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.method == "qlora":
        if not cuda:
            raise RuntimeError(
                "TrainingConfig.method: 'qlora' loads the base model in 4-bit NF4 through bitsandbytes, which needs "
                "a CUDA GPU, and none is visible here (torch.cuda.is_available() is False). Use method='lora' "
                "(same adapter, unquantized base) on this machine.")
        if not torch.cuda.is_bf16_supported():
            raise RuntimeError("TrainingConfig.method: 'qlora' computes in bf16 and needs a bf16-capable GPU "
                               "(Ampere or newer); use method='lora' here.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("TrainingConfig.method: 'qlora' needs the bitsandbytes package") from exc
    if cfg.use_liger_kernel:
        if not cuda:
            raise RuntimeError("TrainingConfig.use_liger_kernel: Liger kernels are Triton GPU kernels; this machine "
                               "has no CUDA GPU. Set use_liger_kernel=false.")
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("TrainingConfig.use_liger_kernel: pip install liger-kernel first") from exc
    if cfg.num_processes > 1 and (not cuda or torch.cuda.device_count() < cfg.num_processes):
        have = torch.cuda.device_count() if cuda else 0
        raise RuntimeError(f"TrainingConfig.num_processes: {cfg.num_processes} processes need as many CUDA GPUs; "
                           f"this machine has {have}.")
    if cfg.attn_implementation and cfg.attn_implementation.startswith("flash_attention") and not cuda:
        raise RuntimeError(f"TrainingConfig.attn_implementation: {cfg.attn_implementation!r} needs a CUDA GPU; "
                           "use 'sdpa' (or null) on CPU.")


def _flash_attn_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_batching(cfg: TrainingConfig) -> str:
    """'auto' -> padding_free on the FlashAttention varlen path, else padded.

    Without a varlen kernel (CPU, or no flash-attn), SDPA takes a padding-free batch through a
    dense block-diagonal mask over the whole concatenated micro-batch: correct, but attention then
    costs (sum of lengths)^2 instead of sum(length^2), which bench/training.py shows is slower on CPU.
    """
    if cfg.batching != "auto":
        return cfg.batching
    attn = cfg.attn_implementation
    varlen = attn.startswith("flash_attention") if attn else _flash_attn_available()
    return "padding_free" if varlen else "padded"


def resolve_attn_implementation(cfg: TrainingConfig) -> str:
    """The attention kernel: the configured one, else FlashAttention-2 (varlen) on CUDA when installed and the
    batches are padding-free, else PyTorch SDPA (which takes padding-free batches through a block-diagonal mask)."""
    if cfg.attn_implementation:
        return cfg.attn_implementation
    if resolve_batching(cfg) != "padded" and _flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def _decoder_blocks(model):
    """(the ModuleList of transformer blocks, the module holding it) of a causal LM."""
    import torch.nn as nn

    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks, base
    lists = [(len(m), parent) for parent in model.modules() for m in parent.children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("method 'freeze': could not find the model's list of transformer blocks")
    _, parent = max(lists, key=lambda x: x[0])
    blocks = next(m for m in parent.children() if isinstance(m, nn.ModuleList))
    return blocks, parent


def freeze_all_but_last_layers(model, n: int) -> list[str]:
    """Freeze every parameter, then unfreeze the last `n` transformer blocks and the final norm.

    Returns the names of the trainable parameters.
    """
    blocks, holder = _decoder_blocks(model)
    if n > len(blocks):
        raise ValueError(f"TrainingConfig.freeze_trainable_layers: the model has only {len(blocks)} "
                         f"transformer blocks (got {n})")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[-n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        norm = getattr(holder, name, None)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
            break
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_model(cfg: TrainingConfig, bf16: bool):
    """The model to train: base weights (4-bit NF4 for qlora), then LoRA adapters or layer freezing."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": resolve_attn_implementation(cfg)}
    if cfg.method == "qlora":
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        )
        kwargs["device_map"] = {"": PartialState().local_process_index}
        kwargs["dtype"] = torch.bfloat16
    else:
        # LoRA keeps the frozen base in bf16 to halve memory; full/freeze keep fp32 master weights
        # and let autocast do bf16 math.
        kwargs["dtype"] = torch.bfloat16 if (bf16 and cfg.method == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, **kwargs)

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules, bias="none")
        model = get_peft_model(model, lora)
    elif cfg.method == "freeze":
        freeze_all_but_last_layers(model, cfg.freeze_trainable_layers)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); 4-bit bitsandbytes weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def model_flops_utilization(tokens_per_second: float, total: int, trainable: int, gradient_checkpointing: bool,
                            num_processes: int = 1, peak_tflops: float | None = None,
                            device_name: str | None = None) -> float | None:
    """MFU = achieved model FLOP/s / peak FLOP/s of the GPUs, or None without a known peak (e.g. on CPU).

    Model FLOPs per token: 2N forward + 2N backward through activations + 2 per trainable weight for
    its gradient (so 6N for full fine-tuning, about 4N for LoRA), +2N when activations are recomputed.
    Attention's sequence-length term is left out, as in the usual 6N estimate.
    """
    peak = peak_tflops * 1e12 if peak_tflops else None
    if peak is None and device_name:
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in device_name.lower()), None)
    if not peak or tokens_per_second <= 0:
        return None
    per_token = 4 * total + 2 * trainable + (2 * total if gradient_checkpointing else 0)
    return round(tokens_per_second * per_token / (peak * num_processes), 4)


# --------------------------------------------------------------------------------------------
# training


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge HF's log entries into one dict per step (train loss, lr, grad norm, eval loss)."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        row = by_step.setdefault(step, {"step": step})
        for key in ("loss", "learning_rate", "grad_norm", "eval_loss"):
            if key in entry and _is_number(entry[key]):
                row[key] = float(entry[key])
    return [by_step[s] for s in sorted(by_step) if len(by_step[s]) > 1]


def _checkpointing_args(config_cls, enabled: bool) -> dict[str, Any]:
    # Set explicitly: TRL defaults it to True. transformers 5.x renamed gradient_checkpointing to
    # activation_checkpointing (old name warns); use whichever this version has.
    # Non-reentrant checkpointing works with a frozen base (LoRA) without input-grad hooks.
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in config_cls.__dataclass_fields__:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def build_trainer(cfg: TrainingConfig, callbacks: list | None = None):
    """Build the model, datasets and `SFTTrainer` for `cfg` (exposed so tests can inspect batches)."""
    import torch
    from transformers import AutoTokenizer, EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    model_dir = Path(cfg.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"TrainingConfig.model_dir: no config.json in {model_dir}")
    check_device_support(cfg)
    set_seed(cfg.seed)
    splits = load_tokenized_splits(cfg.dataset_dir)
    bf16 = _resolve_bf16(cfg) or cfg.method == "qlora"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # the collator pads input_ids with it
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(cfg, bf16)

    has_eval = "validation" in splits
    keep_best = has_eval and cfg.load_best_model_at_end
    callbacks = list(callbacks or [])
    if cfg.early_stopping_patience and not has_eval:
        logger.warning("early stopping is off: %s has no validation rows", cfg.dataset_dir)
    if cfg.early_stopping_patience and keep_best:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience,
                                               early_stopping_threshold=cfg.early_stopping_threshold))
    save_steps = cfg.save_steps or cfg.eval_steps
    if keep_best and save_steps % cfg.eval_steps:
        raise ValueError(f"TrainingConfig.save_steps: must be a multiple of eval_steps ({cfg.eval_steps}) when "
                         f"load_best_model_at_end is on and there is a validation split, so every checkpoint has a "
                         f"validation loss (got {cfg.save_steps})")
    batching = resolve_batching(cfg)
    packed = batching == "packed"
    args = SFTConfig(
        output_dir=str(Path(cfg.output_dir) / CHECKPOINT_SUBDIR),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        # transformers 5 dropped warmup_ratio: a float in [0, 1) here is read as a ratio.
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        # Resumable checkpoints (weights, optimizer, scheduler, RNG, trainer state) every save_steps.
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit or None,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        report_to="none",  # MLflow logging is ours, identical under Dagster and by hand
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=False,
        # Truncation belongs to the tokenization stage; TRL must not cut sequences again
        # (packing needs a row length: longer rows are truncated to it).
        max_length=cfg.packing_length if packed else None,
        packing=packed,
        packing_strategy="bfd",
        eval_packing=False,  # validation loss per conversation, comparable across batching modes
        padding_free=batching == "padding_free",
        use_liger_kernel=cfg.use_liger_kernel,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_checkpointing_args(SFTConfig, cfg.gradient_checkpointing),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # Our step logger prints one line per log (and forwards it to Dagster); drop HF's dict printer.
    trainer.remove_callback(PrinterCallback)
    return trainer, tokenizer, splits


def _prepare_output_dir(cfg: TrainingConfig, fingerprint: str) -> None:
    """Main process only: guard against mixing runs, honour resume=false, drop half-written checkpoints."""
    out = Path(cfg.output_dir)
    ckpts = out / CHECKPOINT_SUBDIR
    fp_file = out / FINGERPRINT_FILE
    previous = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
    has_state = ckpts.is_dir() and any(ckpts.iterdir()) or (out / RECORD_FILE).is_file()
    if previous and previous != fingerprint and has_state and cfg.resume:
        raise ValueError(
            f"TrainingConfig.output_dir: {out} holds checkpoints of a different training (fingerprint {previous}, "
            f"this one is {fingerprint}); use another output_dir, or resume=false to start over there")
    if not cfg.resume or (previous and previous != fingerprint):
        for sub in (CHECKPOINT_SUBDIR, ADAPTER_SUBDIR, FULL_MODEL_SUBDIR):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in (RECORD_FILE, MLFLOW_RUN_FILE):
            (out / name).unlink(missing_ok=True)
    if ckpts.is_dir():  # a kill during a save leaves a folder without trainer_state.json
        for p in ckpts.glob("checkpoint-*"):
            if p.is_dir() and not (p / "trainer_state.json").is_file():
                logger.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
    fp_file.write_text(json.dumps({"fingerprint": fingerprint, "config": cfg.to_dict()}, indent=2))


def find_finished_run(cfg: TrainingConfig, fingerprint: str | None = None) -> TrainingResult | None:
    """The recorded result of a finished run of this training in `cfg.output_dir` whose weights are intact.

    None when `cfg.resume` is off, nothing finished there, or the record is of another fingerprint.
    Needs no torch: the Dagster asset asks it before launching a process.
    """
    path = Path(cfg.output_dir) / RECORD_FILE
    if not cfg.resume or not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != (fingerprint or training_fingerprint(cfg)):
        return None
    known = {f.name for f in dataclasses.fields(TrainingResult)}
    result = TrainingResult(**{k: v for k, v in record.items() if k in known})
    if not result.weights_dir or not Path(result.weights_dir).is_dir() or \
            weights_content_hash(result.weights_dir) != result.weights_hash:
        return None
    result.reused = True
    return result


def train(cfg: TrainingConfig | dict[str, Any]) -> TrainingResult:
    """Fine-tune `cfg.model_dir` on `cfg.dataset_dir`, save the weights and a training record.

    Resumes from the last complete checkpoint in `output_dir` (or returns the finished run) when the
    fingerprint matches and `resume` is on. Raises RuntimeError if the training loss is not finite
    (nothing is saved then).
    """
    if isinstance(cfg, dict):
        cfg = TrainingConfig.from_dict(cfg)
    cfg.validate()
    from accelerate import PartialState

    state = PartialState()
    is_main = state.is_main_process
    output_dir = Path(cfg.output_dir)
    if not (Path(cfg.dataset_dir) / "train.parquet").is_file():
        raise FileNotFoundError(f"TrainingConfig.dataset_dir: {Path(cfg.dataset_dir) / 'train.parquet'} does not exist")
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = training_fingerprint(cfg)
    if is_main:
        _prepare_output_dir(cfg, fingerprint)
    state.wait_for_everyone()
    finished = find_finished_run(cfg, fingerprint)
    if finished is not None:
        logger.info("training %s already finished in %s (step %d); reusing it (resume=false retrains)",
                    fingerprint, output_dir, finished.global_step)
        return finished
    resume_from = last_complete_checkpoint(output_dir / CHECKPOINT_SUBDIR) if cfg.resume else None
    if resume_from:
        logger.info("resuming training %s from %s", fingerprint, resume_from)

    mlflow_run = _MlflowRun(cfg, fingerprint, resuming=resume_from is not None) \
        if (cfg.mlflow_tracking_uri and is_main) else None
    try:
        if mlflow_run is not None:
            mlflow_run.log_dataset_inputs(cfg.dataset_dir, dataset_content_hash(cfg.dataset_dir))
            if resume_from:
                mlflow_run.client.set_tag(mlflow_run.run_id, "sft_pipeline.resumed_from", resume_from.name)
        result = _train(cfg, mlflow_run, is_main, fingerprint, resume_from)
    except BaseException as exc:
        if mlflow_run is not None:
            with contextlib.suppress(Exception):  # never mask the training error
                mlflow_run.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if mlflow_run is not None:
        final = {"final_train_loss": result.train_loss, "mean_train_loss": result.mean_train_loss,
                 "tokens_seen": result.tokens_seen, "tokens_per_second": result.tokens_per_second,
                 "train_runtime_s": result.train_runtime_s, "trainable_parameters": result.trainable_parameters,
                 "trainable_share": result.trainable_parameters / max(result.total_parameters, 1)}
        if result.peak_memory_mib is not None:
            final["peak_memory_mib"] = result.peak_memory_mib
        if result.mfu is not None:
            final["mfu"] = result.mfu
        if result.eval_loss is not None:
            final["final_eval_loss"] = result.eval_loss
        mlflow_run.log_metrics(final, step=result.global_step)
        mlflow_run.end("FINISHED", artifacts=[output_dir / RECORD_FILE])
    return result


def _train(cfg: TrainingConfig, mlflow_run: _MlflowRun | None, is_main: bool, fingerprint: str,
           resume_from: Path | None) -> TrainingResult:
    import torch
    from transformers import EarlyStoppingCallback

    output_dir = Path(cfg.output_dir)
    step_logger = _make_callback(mlflow_run)
    trainer, tokenizer, splits = build_trainer(cfg, callbacks=[step_logger])
    model = trainer.model
    trainable, total = count_parameters(model)
    logger.info("method=%s trainable parameters %d of %d (%.2f%%), batching=%s, attention=%s", cfg.method,
                trainable, total, 100 * trainable / max(total, 1), resolve_batching(cfg),
                model.config._attn_implementation if hasattr(model, "config") else "?")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.perf_counter() - t0

    state = trainer.state
    history = _history(state.log_history)
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses:
        raise RuntimeError("training logged no loss; check logging_steps against max_steps")
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training loss became non-finite ({losses}); lower learning_rate or check the data")

    stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    early_stopped = bool(stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
                         and state.global_step < state.max_steps)
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    eval_loss = None
    if "validation" in splits:
        evals = [h for h in history if "eval_loss" in h]
        if best and state.best_metric is not None:  # the weights saved below are the best checkpoint's
            eval_loss = float(state.best_metric)
        elif evals and evals[-1]["step"] == state.global_step:
            eval_loss = evals[-1]["eval_loss"]
        else:  # make sure the reported eval loss is of the final weights
            eval_loss = float(trainer.evaluate()["eval_loss"])
            history = _history(state.log_history)

    weights_dir = output_dir / (ADAPTER_SUBDIR if cfg.method in ("lora", "qlora") else FULL_MODEL_SUBDIR)
    # save_model handles distributed/FSDP gathering and writes only on the main process; for a
    # PeftModel it writes just the adapter. The tokenizer goes along so the folder is loadable.
    if is_main:  # no stale files from an earlier run in the folder whose hash becomes the data version
        shutil.rmtree(weights_dir, ignore_errors=True)
    trainer.save_model(str(weights_dir))
    if is_main:
        tokenizer.save_pretrained(weights_dir)
        (weights_dir / "training_args.bin").unlink(missing_ok=True)  # pickled; not needed to load

    tokens = int(state.num_input_tokens_seen)
    tokens_here = max(tokens - step_logger.tokens_start, 0)
    tps = round(tokens_here / runtime, 2) if runtime > 0 else 0.0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = TrainingResult(
        output_dir=str(output_dir),
        method=cfg.method,
        adapter_dir=str(weights_dir) if cfg.method in ("lora", "qlora") else None,
        model_dir=str(weights_dir) if cfg.method in ("full", "freeze") else None,
        base_model_dir=str(Path(cfg.model_dir).resolve()),
        train_loss=float(losses[-1]),
        mean_train_loss=float(sum(losses) / len(losses)),
        eval_loss=eval_loss,
        history=history,
        global_step=int(state.global_step),
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        train_rows=len(splits["train"]),
        validation_rows=len(splits["validation"]) if "validation" in splits else 0,
        tokens_seen=tokens,
        train_runtime_s=round(runtime, 3),
        tokens_per_second=tps,
        mlflow_run_id=mlflow_run.run_id if mlflow_run else None,
        fingerprint=fingerprint,
        weights_hash=weights_content_hash(weights_dir) if is_main else "",
        resumed_from_checkpoint=str(resume_from) if resume_from else None,
        early_stopped=early_stopped,
        best_checkpoint=best,
        max_steps=int(state.max_steps),
        peak_memory_mib=peak_memory_mib(),
        mfu=model_flops_utilization(tps, total, trainable, cfg.gradient_checkpointing, cfg.num_processes,
                                    cfg.peak_tflops, device) if device != "cpu" else None,
        device=device,
        batching=resolve_batching(cfg),
        attn_implementation=str(getattr(getattr(model, "config", None), "_attn_implementation", "") or ""),
        num_processes=int(trainer.args.world_size),
    )
    if is_main:
        record = {**result.to_dict(), "config": cfg.to_dict()}
        (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return result


# --------------------------------------------------------------------------------------------
# launching and Dagster Pipes (optional)


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


def materialization_metadata(result: TrainingResult) -> dict[str, Any]:
    """Scalar metadata of a result, for a Dagster materialization (None values left out)."""
    values = {
        "method": result.method,
        "train_loss": result.train_loss,
        "mean_train_loss": result.mean_train_loss,
        "eval_loss": result.eval_loss,
        "steps": result.global_step,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "trainable_share": round(result.trainable_parameters / max(result.total_parameters, 1), 6),
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": result.tokens_per_second,
        "wall_time_s": result.train_runtime_s,
        "peak_memory_mib": result.peak_memory_mib,
        "mfu": result.mfu,
        "device": result.device,
        "batching": result.batching,
        "attn_implementation": result.attn_implementation,
        "early_stopped": result.early_stopped,
        "best_checkpoint": result.best_checkpoint,
        "resumed_from_checkpoint": result.resumed_from_checkpoint,
        "reused_finished_run": result.reused,
        "training_fingerprint": result.fingerprint,
        "mlflow_run_id": result.mlflow_run_id,
    }
    return {k: v for k, v in values.items() if v is not None}


def _open_pipes():
    """`open_dagster_pipes()` when dagster-pipes is installed and Dagster launched this process (rank 0 only)."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext(None)
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
    except ImportError:
        return contextlib.nullcontext(None)
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return contextlib.nullcontext(None)
    return open_dagster_pipes()


class _PipesLogHandler(logging.Handler):
    """Forwards this process's log records to the Dagster run through the Pipes log channel."""

    def __init__(self, pipes):
        super().__init__(level=logging.INFO)
        self.pipes = pipes
        self._busy = False
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self._busy or record.name.startswith("dagster"):
            return
        self._busy = True
        try:
            self.pipes.log.log(record.levelno, self.format(record))
        except Exception:  # a lost log line must not stop training
            pass
        finally:
            self._busy = False


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_pipeline.training", description="Fine-tune a base model on a pre-tokenized dataset.",
        epilog="Runs under `accelerate launch -m sft_pipeline.training ...` too; see docs/training.md.",
    )
    parser.add_argument("--config", required=True, help="JSON file with TrainingConfig fields.")
    parser.add_argument("--output-json", help="Where to write the TrainingResult JSON (default: stdout only).")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainingConfig.from_json(ns.config)
    with _open_pipes() as pipes:
        handler = None
        if pipes is not None:
            handler = _PipesLogHandler(pipes)
            logging.getLogger().addHandler(handler)
        error_path = Path(ns.output_json).with_suffix(".error.txt") if ns.output_json else None
        if error_path is not None:
            error_path.unlink(missing_ok=True)
        try:
            result = train(cfg)
        except Exception as exc:
            # One readable line for whoever launched this process (the Dagster asset raises it).
            logger.error("training failed: %s: %s", type(exc).__name__, exc)
            if error_path is not None and int(os.environ.get("RANK", "0")) == 0:
                error_path.parent.mkdir(parents=True, exist_ok=True)
                error_path.write_text(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
        from accelerate import PartialState

        if PartialState().is_main_process:
            text = json.dumps(result.to_dict(), indent=2)
            if ns.output_json:
                Path(ns.output_json).parent.mkdir(parents=True, exist_ok=True)
                Path(ns.output_json).write_text(text)
            else:
                print(text)
            if pipes is not None:
                pipes.report_asset_materialization(metadata=materialization_metadata(result),
                                                   data_version=result.weights_hash)
    return 0


if __name__ == "__main__":
    sys.exit(main())
