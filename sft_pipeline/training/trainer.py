"""The training itself: build the SFTTrainer for a config, run it (resuming), save the weights and the record."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from sft_pipeline.hashing import model_digest
from sft_pipeline.training.batching import labeled_tokens, split_padded_batch
from sft_pipeline.training.callbacks import make_step_logger, make_step_memory
from sft_pipeline.training.config import TrainingConfig
from sft_pipeline.training.data import load_tokenized_splits
from sft_pipeline.training.device import (
    check_device_support,
    resolve_batching,
    resolve_bf16,
    resolve_max_batch_tokens,
    uses_cpu,
)
from sft_pipeline.training.distributed import replica_digests
from sft_pipeline.training.fingerprint import dataset_content_hash, training_fingerprint
from sft_pipeline.training.loss import compact_lm_head
from sft_pipeline.training.mlflow_run import MlflowRun
from sft_pipeline.training.model import count_parameters, load_model
from sft_pipeline.training.performance import (
    MEMORY,
    bound_kernel_caches,
    lean_heap,
    model_flops_utilization,
    peak_memory_mib,
)
from sft_pipeline.training.records import (
    ADAPTER_SUBDIR,
    CHECKPOINT_SUBDIR,
    FULL_MODEL_SUBDIR,
    RECORD_FILE,
    TrainingResult,
    find_finished_run,
    history_from_logs,
    last_complete_checkpoint,
    prepare_output_dir,
)

logger = logging.getLogger(__name__)


def _checkpointing_args(config_cls, enabled: bool) -> dict[str, Any]:
    # Set explicitly: TRL defaults it to True. transformers 5.x renamed gradient_checkpointing to
    # activation_checkpointing (old name warns); use whichever this version has.
    # Non-reentrant checkpointing works with a frozen base (LoRA) without input-grad hooks.
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in config_cls.__dataclass_fields__:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def _sampling_args(config_cls, length_grouped: bool) -> dict[str, Any]:
    # transformers 5 replaced group_by_length=True with train_sampling_strategy="group_by_length".
    if "train_sampling_strategy" in config_cls.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if length_grouped else "random"}
    return {"group_by_length": length_grouped}


def sft_trainer_class():
    """`SFTTrainer` plus split padded micro-batches (batching.py), a heap that returns large tensors
    (performance.lean_heap) and the per-step peak memory in the logs."""
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def __init__(self, *args, max_batch_tokens: int = 0, step_memory=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.max_batch_tokens = max_batch_tokens
            self.step_memory = step_memory

        def train(self, *args, **kwargs):
            with lean_heap():
                return super().train(*args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            groups = split_padded_batch(inputs, self.max_batch_tokens) if self.max_batch_tokens else None
            if groups is None:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:  # each group's loss is then its share of this micro-batch's mean
                num_items_in_batch = labeled_tokens(inputs).to(self.args.device)
            del inputs
            total = None
            for k, group in enumerate(groups):
                last = k == len(groups) - 1  # gradients are synchronized (several processes) after the last group
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, group, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

        def log(self, logs, start_time=None):
            if self.step_memory is not None and "loss" in logs:
                peak = self.step_memory.take()
                if peak is not None:
                    logs["peak_memory_mib"] = peak
            if "eval_loss" in logs:
                peak = MEMORY.interval_peak_mib()
                if peak is not None:
                    logs["eval_peak_memory_mib"] = peak
            super().log(logs, start_time)

        def evaluate(self, *args, **kwargs):
            MEMORY.begin()  # the evaluation's own peak, reported with its eval_loss
            return super().evaluate(*args, **kwargs)

    return LeanSFTTrainer


def build_trainer(cfg: TrainingConfig, callbacks: list | None = None):
    """Build the model, datasets and `SFTTrainer` for `cfg` (exposed so tests can inspect batches)."""
    import torch
    from transformers import AutoTokenizer, EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTConfig

    model_dir = Path(cfg.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"TrainingConfig.model_dir: no config.json in {model_dir}")
    check_device_support(cfg)
    bound_kernel_caches()  # before this process's first matrix product, or it has no effect
    set_seed(cfg.seed)
    splits = load_tokenized_splits(cfg.dataset_dir)
    bf16 = resolve_bf16(cfg) or cfg.method == "qlora"

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
        # Several processes on a CPU (torchrun, Ray Train) are gloo ranks only when accelerate is told "cpu".
        use_cpu=uses_cpu(cfg),
        # FSDP / DeepSpeed are the trainer's own options, so they work under every launcher.
        **({"fsdp": True, "fsdp_config": cfg.fsdp_config} if cfg.fsdp else {}),
        **({"deepspeed": cfg.deepspeed} if cfg.deepspeed else {}),
        **_sampling_args(SFTConfig, batching == "length_grouped"),
        **_checkpointing_args(SFTConfig, cfg.gradient_checkpointing),
    )
    step_memory = make_step_memory()
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        processing_class=tokenizer,
        callbacks=[step_memory, *callbacks],
        max_batch_tokens=resolve_max_batch_tokens(cfg),
        step_memory=step_memory,
    )
    # Our step logger prints one line per log (and forwards it to Dagster); drop HF's dict printer.
    trainer.remove_callback(PrinterCallback)
    if trainer.args.device.type == "cpu":  # on CUDA TRL's head already projects only the labeled positions
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        compact_lm_head(base)
    return trainer, tokenizer, splits


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

    # torchrun / Ray Train ranks: on a CPU, accelerate joins them as gloo ranks only when told "cpu".
    state = PartialState(cpu=uses_cpu(cfg))
    is_main = state.is_main_process
    output_dir = Path(cfg.output_dir)
    if not (Path(cfg.dataset_dir) / "train.parquet").is_file():
        raise FileNotFoundError(f"TrainingConfig.dataset_dir: {Path(cfg.dataset_dir) / 'train.parquet'} does not exist")
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = training_fingerprint(cfg)
    if is_main:
        prepare_output_dir(cfg, fingerprint)
    state.wait_for_everyone()
    finished = find_finished_run(cfg, fingerprint)
    if finished is not None:
        logger.info("training %s already finished in %s (step %d); reusing it (resume=false retrains)",
                    fingerprint, output_dir, finished.global_step)
        return finished
    resume_from = last_complete_checkpoint(output_dir / CHECKPOINT_SUBDIR) if cfg.resume else None
    if resume_from:
        logger.info("resuming training %s from %s", fingerprint, resume_from)

    mlflow_run = MlflowRun(cfg, fingerprint, resuming=resume_from is not None) \
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


def _train(cfg: TrainingConfig, mlflow_run: MlflowRun | None, is_main: bool, fingerprint: str,
           resume_from: Path | None) -> TrainingResult:
    import torch
    from transformers import EarlyStoppingCallback

    output_dir = Path(cfg.output_dir)
    step_logger = make_step_logger(mlflow_run)
    trainer, tokenizer, splits = build_trainer(cfg, callbacks=[step_logger])
    model = trainer.model
    trainable, total = count_parameters(model)
    precision = "bf16" if trainer.args.bf16 else "fp32"
    logger.info("method=%s trainable parameters %d of %d (%.2f%%), batching=%s, attention=%s, precision=%s",
                cfg.method, trainable, total, 100 * trainable / max(total, 1), resolve_batching(cfg),
                model.config._attn_implementation if hasattr(model, "config") else "?", precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.perf_counter() - t0

    state = trainer.state
    history = history_from_logs(state.log_history)
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
            history = history_from_logs(state.log_history)

    weights_dir = output_dir / (ADAPTER_SUBDIR if cfg.method in ("lora", "qlora") else FULL_MODEL_SUBDIR)
    # save_model handles distributed/FSDP gathering and writes only on the main process; for a
    # PeftModel it writes just the adapter. The tokenizer goes along so the folder is loadable.
    if is_main:  # no stale files from an earlier run in the folder whose hash becomes the data version
        shutil.rmtree(weights_dir, ignore_errors=True)
    trainer.save_model(str(weights_dir))
    if is_main:
        tokenizer.save_pretrained(weights_dir)
        (weights_dir / "training_args.bin").unlink(missing_ok=True)  # pickled; not needed to load

    # Data parallel: every rank must hold the same weights (sharded FSDP/ZeRO-3 parameters are not compared).
    digests = replica_digests(trainer.model_wrapped, sharded=bool(cfg.fsdp or cfg.deepspeed))
    if digests and len(set(digests)) > 1:
        logger.error("the %d ranks ended with different weights: %s", len(digests), digests)
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
        weights_hash=model_digest(weights_dir) if is_main else "",
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
        precision=precision,
        num_processes=int(trainer.args.world_size),
        launcher=cfg.launcher,
        replica_weight_digests=digests,
    )
    if is_main:
        record = {**result.to_dict(), "config": cfg.to_dict()}
        (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return result
