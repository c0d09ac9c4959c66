"""A run's output folder: its layout, the training record (TrainingResult), checkpoints, finished-run lookup."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_pipeline.hashing import model_digest
from sft_pipeline.training.config import TrainingConfig
from sft_pipeline.training.fingerprint import training_fingerprint

logger = logging.getLogger(__name__)

RECORD_FILE = "training_record.json"
FINGERPRINT_FILE = "fingerprint.json"
MLFLOW_RUN_FILE = "mlflow_run.json"
CHECKPOINT_SUBDIR = "checkpoints"
ADAPTER_SUBDIR = "adapter"
FULL_MODEL_SUBDIR = "model"


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
    fingerprint: str = ""  # training_fingerprint: digest of (training fields, dataset, base model) that keys resume
    weights_hash: str = ""  # hashing.model_digest of the saved adapter/model folder (the Dagster data version)
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
    precision: str = "fp32"  # "bf16": bf16 mixed precision (LoRA: a bf16 frozen base); "fp32" otherwise
    num_processes: int = 1
    launcher: str = "local"
    # Data parallel: a digest of the trainable weights each rank ended with (rank order); all equal when in step
    replica_weight_digests: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def weights_dir(self) -> str:
        return self.adapter_dir or self.model_dir or ""


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def history_from_logs(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge HF's log entries into one dict per step (train loss, lr, grad norm, eval loss, peak memory).

    `peak_memory_mib` is the peak of the training steps since the previous training log (one step
    with logging_steps 1), `eval_peak_memory_mib` that of the evaluation at that step: CPU resident
    set size or CUDA allocated memory, in MiB.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        row = by_step.setdefault(step, {"step": step})
        for key in ("loss", "learning_rate", "grad_norm", "eval_loss", "peak_memory_mib", "eval_peak_memory_mib"):
            if key in entry and is_number(entry[key]):
                row[key] = float(entry[key])
    return [by_step[s] for s in sorted(by_step) if len(by_step[s]) > 1]


def last_complete_checkpoint(checkpoint_root: str | Path) -> Path | None:
    """The highest `checkpoint-<step>` folder whose trainer_state.json (written last) exists."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def prepare_output_dir(cfg: TrainingConfig, fingerprint: str) -> None:
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
            model_digest(result.weights_dir) != result.weights_hash:
        return None
    result.reused = True
    return result
