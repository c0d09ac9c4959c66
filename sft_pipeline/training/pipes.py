"""Reporting to Dagster from the training process through dagster-pipes (imported lazily), and the metadata reported."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from sft_pipeline.training.distributed import world_rank
from sft_pipeline.training.performance import step_peak_growth_mib
from sft_pipeline.training.records import TrainingResult


def materialization_metadata(result: TrainingResult) -> dict[str, Any]:
    """Scalar metadata of a result, for a Dagster materialization (None values left out).

    Besides the run's peak memory: the peak of the first and of the last logged training step and
    how much the step peaks grew from the first half of the run to the second (flat: about 0).
    """
    step_peaks = [h["peak_memory_mib"] for h in result.history if "peak_memory_mib" in h]
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
        "first_step_peak_memory_mib": step_peaks[0] if step_peaks else None,
        "last_step_peak_memory_mib": step_peaks[-1] if step_peaks else None,
        "step_peak_memory_growth_mib": step_peak_growth_mib(step_peaks),
        "mfu": result.mfu,
        "device": result.device,
        "batching": result.batching,
        "attn_implementation": result.attn_implementation,
        "precision": result.precision,
        "early_stopped": result.early_stopped,
        "best_checkpoint": result.best_checkpoint,
        "resumed_from_checkpoint": result.resumed_from_checkpoint,
        "reused_finished_run": result.reused,
        "training_fingerprint": result.fingerprint,
        "mlflow_run_id": result.mlflow_run_id,
        "launcher": result.launcher,
        "num_processes": result.num_processes,
        "replicas_identical": len(set(result.replica_weight_digests)) == 1 if result.replica_weight_digests else None,
    }
    return {k: v for k, v in values.items() if v is not None}


def open_pipes():
    """`open_dagster_pipes()` when dagster-pipes is installed and Dagster launched this process (rank 0 only)."""
    if world_rank() != 0:  # one rank talks to Dagster: one materialization, one copy of each log line
        return contextlib.nullcontext(None)
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
    except ImportError:
        return contextlib.nullcontext(None)
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return contextlib.nullcontext(None)
    return open_dagster_pipes()


class PipesLogHandler(logging.Handler):
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
