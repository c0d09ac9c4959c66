"""Trainer callbacks: per-step peak memory, and the per-step logger (log lines forwarded to Dagster, metrics to MLflow)."""

from __future__ import annotations

import logging
import time

from sft_pipeline.training.mlflow_run import MlflowRun
from sft_pipeline.training.performance import MEMORY, peak_memory_mib

logger = logging.getLogger(__name__)

# HF log key -> MLflow metric name
METRIC_KEYS = {"loss": "train_loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate",
                "grad_norm": "grad_norm", "peak_memory_mib": "peak_memory_mib",
                "eval_peak_memory_mib": "eval_peak_memory_mib"}


def make_step_memory():
    """A callback that measures each optimizer step's peak memory (see performance.MemoryTracker).

    `take()` returns the largest step peak since the previous call (the trainer adds it to each
    training log, so the history has one value per logged step).
    """
    from transformers import TrainerCallback

    class _StepMemory(TrainerCallback):
        def __init__(self):
            self.pending: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            MEMORY.begin()

        def on_step_end(self, args, state, control, **kwargs):
            peak = MEMORY.interval_peak_mib()
            if peak is not None:
                self.pending.append(peak)

        def take(self) -> float | None:
            peak = max(self.pending, default=None)
            self.pending.clear()
            return peak

    return _StepMemory()


def make_step_logger(mlflow_run: MlflowRun | None):
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
            metrics = {METRIC_KEYS[k]: v for k, v in logs.items() if k in METRIC_KEYS}
            if "loss" in logs:  # a training log: throughput since the previous one
                now, tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)
                if now > self.t_last and tokens > self.tokens_last:
                    metrics["tokens_per_second"] = (tokens - self.tokens_last) / (now - self.t_last)
                self.t_last, self.tokens_last = now, tokens
                metrics["tokens_seen"] = tokens
                metrics.setdefault("peak_memory_mib", peak_memory_mib())  # the step's peak, else the run's
            if not metrics:
                return
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            logger.info("step %d/%d %s", state.global_step, state.max_steps, text)
            if mlflow_run is not None:
                mlflow_run.log_metrics(metrics, step=state.global_step)

    return _StepLogger()
