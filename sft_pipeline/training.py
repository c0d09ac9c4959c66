"""Supervised fine-tuning (LoRA or full) on a pre-tokenized Parquet dataset.

Plain domain module: no Dagster import. It runs on a GPU box that has only
torch/transformers/peft/trl/accelerate/datasets/pandas/pyarrow; mlflow is imported only when
tracking is requested. Runs by hand (``python -m sft_pipeline.training --config cfg.json``),
under ``accelerate launch``, or from the Dagster asset, all through :func:`train`.

Input: ``dataset_dir/{train,validation}.parquet`` with ``input_ids``, ``attention_mask``,
``labels`` (-100 on non-assistant tokens) and ``length``. The rows are used as they are: TRL's
``SFTTrainer`` treats a dataset with ``input_ids`` as pre-tokenized and keeps a ``labels``
column, so nothing is tokenized or templated twice and the loss stays on assistant tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_METHODS = ("lora", "full")
# Named so a user asking for them gets "not yet" rather than "unknown".
PLANNED_METHODS = ("qlora", "freeze", "8bit")
# transformers' SchedulerType values (the ones that need no extra kwargs); listed here rather
# than imported so building a config does not import torch (seconds) in the Dagster process.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
RECORD_FILE = "training_record.json"
ADAPTER_SUBDIR = "adapter"
FULL_MODEL_SUBDIR = "model"


@dataclass
class TrainingConfig:
    """Everything one training run needs; JSON-serializable so the CLI and Dagster share it."""

    model_dir: str = field(metadata={"help": "Local Hugging Face folder of the base model and tokenizer."})
    dataset_dir: str = field(
        metadata={"help": "Folder holding train.parquet (and validation.parquet) from the tokenization stage."}
    )
    output_dir: str = field(metadata={"help": "Where the adapter/model and training_record.json are written."})
    method: str = field(
        default="lora", metadata={"help": "Fine-tuning method: 'lora' (adapter only) or 'full' (all weights)."}
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
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (effective scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "Modules to adapt: 'all-linear' or a list of module names (e.g. ['q_proj', 'v_proj'])."},
    )
    eval_steps: int = field(
        default=10, metadata={"help": "Evaluate on the validation split every this many steps (if it has rows)."}
    )
    logging_steps: int = field(default=1, metadata={"help": "Log train loss and learning rate every this many steps."})
    seed: int = field(default=42, metadata={"help": "Seed for model init of adapters, data order and dropout."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory (slower)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; None = on for bf16-capable CUDA, off (fp32) on CPU."}
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
                    "logging_steps")
        for name in ints_pos:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("max_steps", "seed", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be > 0")
        for name in ("num_train_epochs", "learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm",
                     "lora_dropout"):
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
        t = self.lora_target_modules
        if not (isinstance(t, str) and t) and not (
            isinstance(t, (list, tuple)) and t and all(isinstance(m, str) and m for m in t)
        ):
            raise bad("lora_target_modules", "must be 'all-linear' or a non-empty list of module names")
        if isinstance(t, tuple):
            self.lora_target_modules = list(t)
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise bad("lr_scheduler_type", f"must be one of {list(LR_SCHEDULERS)}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise bad("bf16", "must be true, false or null")
        if not isinstance(self.gradient_checkpointing, bool):
            raise bad("gradient_checkpointing", "must be true or false")
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


@dataclass
class TrainingResult:
    """What a run produced; written to ``output_dir/training_record.json`` with the config."""

    output_dir: str
    method: str
    adapter_dir: str | None  # set for LoRA
    model_dir: str | None  # set for full fine-tuning
    base_model_dir: str
    train_loss: float  # last logged training loss
    mean_train_loss: float  # average over the whole run (HF's TrainOutput.training_loss)
    eval_loss: float | None
    history: list[dict[str, Any]]
    global_step: int
    trainable_parameters: int
    total_parameters: int
    train_rows: int
    validation_rows: int
    tokens_seen: int  # non-pad input tokens fed to the model during training
    train_runtime_s: float
    tokens_per_second: float
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        # Only what the model consumes; the collator rebuilds attention_mask from the lengths.
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
    """One MLflow run driven through MlflowClient, so it never touches a caller's fluent run."""

    def __init__(self, cfg: TrainingConfig):
        from mlflow import MlflowClient

        from sft_pipeline.registry import ensure_experiment

        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        exp_id = ensure_experiment(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
        tags = {"sft_pipeline.stage": "training", "sft_pipeline.method": cfg.method, **cfg.mlflow_tags}
        run = self.client.create_run(exp_id, run_name=cfg.mlflow_run_name, tags=tags)
        self.run_id = run.info.run_id
        params = {k: v for k, v in cfg.to_dict().items() if k != "mlflow_tags"}
        self.log_params(params)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=items, synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items, synchronous=True)

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


def _make_callback(mlflow_run: _MlflowRun | None):
    from transformers import TrainerCallback

    class _StepLogger(TrainerCallback):
        """Streams per-step metrics to MLflow while training runs (visible live in the UI)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if mlflow_run is None or not state.is_world_process_zero or not logs:
                return
            metrics = {_METRIC_KEYS[k]: v for k, v in logs.items() if k in _METRIC_KEYS}
            mlflow_run.log_metrics(metrics, step=state.global_step)

    return _StepLogger()


# --------------------------------------------------------------------------------------------
# training


def _resolve_bf16(cfg: TrainingConfig) -> bool:
    import torch

    capable = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.bf16 is None:
        return capable
    if cfg.bf16 and not capable:
        raise ValueError("TrainingConfig.bf16: true needs a bf16-capable CUDA GPU; use null for auto")
    return cfg.bf16


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
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    model_dir = Path(cfg.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"TrainingConfig.model_dir: no config.json in {model_dir}")
    set_seed(cfg.seed)
    splits = load_tokenized_splits(cfg.dataset_dir)
    bf16 = _resolve_bf16(cfg)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # the collator pads input_ids with it
        tokenizer.pad_token = tokenizer.eos_token
    # LoRA keeps the frozen base in bf16 to halve memory; full fine-tuning keeps fp32 master
    # weights and lets autocast do bf16 math.
    dtype = torch.bfloat16 if (bf16 and cfg.method == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)

    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            bias="none",
        )
        model = get_peft_model(model, lora)

    has_eval = "validation" in splits
    args = SFTConfig(
        output_dir=str(Path(cfg.output_dir) / "trainer"),
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
        save_strategy="no",  # the final weights are saved explicitly; no checkpoint clutter
        report_to="none",  # MLflow logging is ours, identical under Dagster and by hand
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=False,
        # Truncation belongs to the tokenization stage; TRL must not cut sequences again.
        max_length=None,
        packing=False,
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
        callbacks=callbacks or [],
    )
    return trainer, tokenizer, splits


def train(cfg: TrainingConfig | dict[str, Any]) -> TrainingResult:
    """Fine-tune `cfg.model_dir` on `cfg.dataset_dir`, save the weights and a training record.

    Raises RuntimeError if the training loss is not finite (nothing is saved then).
    """
    if isinstance(cfg, dict):
        cfg = TrainingConfig.from_dict(cfg)
    cfg.validate()
    from accelerate import PartialState

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    is_main = PartialState().is_main_process
    mlflow_run = _MlflowRun(cfg) if (cfg.mlflow_tracking_uri and is_main) else None
    try:
        result = _train(cfg, mlflow_run, is_main)
    except BaseException as exc:
        if mlflow_run is not None:
            with contextlib.suppress(Exception):  # never mask the training error
                mlflow_run.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if mlflow_run is not None:
        final = {"final_train_loss": result.train_loss, "mean_train_loss": result.mean_train_loss,
                 "tokens_seen": result.tokens_seen, "tokens_per_second": result.tokens_per_second,
                 "train_runtime_s": result.train_runtime_s,
                 "trainable_parameters": result.trainable_parameters}
        if result.eval_loss is not None:
            final["final_eval_loss"] = result.eval_loss
        mlflow_run.log_metrics(final, step=result.global_step)
        mlflow_run.end("FINISHED", artifacts=[output_dir / RECORD_FILE])
    return result


def _train(cfg: TrainingConfig, mlflow_run: _MlflowRun | None, is_main: bool) -> TrainingResult:
    output_dir = Path(cfg.output_dir)
    trainer, tokenizer, splits = build_trainer(cfg, callbacks=[_make_callback(mlflow_run)])
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    train_output = trainer.train()
    runtime = time.perf_counter() - t0

    history = _history(trainer.state.log_history)
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses:
        raise RuntimeError("training logged no loss; check logging_steps against max_steps")
    train_loss = losses[-1]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training loss became non-finite ({losses}); lower learning_rate or check the data")

    eval_loss = None
    if "validation" in splits:
        evals = [h for h in history if "eval_loss" in h]
        if evals and evals[-1]["step"] == trainer.state.global_step:
            eval_loss = evals[-1]["eval_loss"]
        else:  # make sure the reported eval loss is of the final weights
            eval_loss = float(trainer.evaluate()["eval_loss"])
            history = _history(trainer.state.log_history)

    weights_dir = output_dir / (ADAPTER_SUBDIR if cfg.method == "lora" else FULL_MODEL_SUBDIR)
    # save_model handles distributed/FSDP gathering and writes only on the main process; for a
    # PeftModel it writes just the adapter. The tokenizer goes along so the folder is loadable.
    trainer.save_model(str(weights_dir))
    if is_main:
        tokenizer.save_pretrained(weights_dir)
        (weights_dir / "training_args.bin").unlink(missing_ok=True)  # pickled; not needed to load

    if is_main:  # the Trainer's own output_dir stays empty with save_strategy="no"
        with contextlib.suppress(OSError):
            Path(trainer.args.output_dir).rmdir()

    tokens = int(trainer.state.num_input_tokens_seen)
    result = TrainingResult(
        output_dir=str(output_dir),
        method=cfg.method,
        adapter_dir=str(weights_dir) if cfg.method == "lora" else None,
        model_dir=str(weights_dir) if cfg.method == "full" else None,
        base_model_dir=str(Path(cfg.model_dir).resolve()),
        train_loss=float(train_loss),
        mean_train_loss=float(train_output.training_loss),
        eval_loss=eval_loss,
        history=history,
        global_step=int(trainer.state.global_step),
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        train_rows=len(splits["train"]),
        validation_rows=len(splits["validation"]) if "validation" in splits else 0,
        tokens_seen=tokens,
        train_runtime_s=round(runtime, 3),
        tokens_per_second=round(tokens / runtime, 2) if runtime > 0 else 0.0,
        mlflow_run_id=mlflow_run.run_id if mlflow_run else None,
    )
    if is_main:
        record = {**result.to_dict(), "config": cfg.to_dict()}
        (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return result


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_pipeline.training", description="Fine-tune a base model on a pre-tokenized dataset."
    )
    parser.add_argument("--config", required=True, help="JSON file with TrainingConfig fields.")
    parser.add_argument("--output-json", help="Where to write the TrainingResult JSON (default: stdout only).")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainingConfig.from_json(ns.config)
    result = train(cfg)
    text = json.dumps(result.to_dict(), indent=2)
    from accelerate import PartialState

    if PartialState().is_main_process:
        if ns.output_json:
            Path(ns.output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.output_json).write_text(text)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
