"""Supervised fine-tuning (LoRA, QLoRA, full, freeze) on a pre-tokenized Parquet dataset.

Plain domain package: no Dagster import. It runs on a GPU box that has only
torch/transformers/peft/trl/accelerate/datasets/pandas/pyarrow; mlflow and dagster-pipes are
imported lazily and only when used. Runs by hand (``python -m sft_pipeline.training --config
cfg.json``), as several data-parallel ranks under ``torchrun`` or ``accelerate launch`` (see
:func:`launch_command`), as Ray Train workers of a Ray job (``ray_train``), or from the Dagster asset
through Dagster Pipes, all through :func:`train`.

Input: ``dataset_dir/{train,validation}.parquet`` with ``input_ids``, ``attention_mask``,
``labels`` (-100 on non-assistant tokens) and ``length``. The rows are used as they are: TRL's
``SFTTrainer`` treats a dataset with ``input_ids`` as pre-tokenized and keeps a ``labels``
column, so nothing is tokenized or templated twice and the loss stays on assistant tokens.

Resume: ``output_dir`` holds ``checkpoints/checkpoint-<step>`` every ``save_steps`` and a
``fingerprint.json``; a rerun with the same configuration, data and base model resumes from the
last complete checkpoint (or reuses a finished run) instead of starting over.

Modules, in the order a run uses them:

* ``config``: TrainingConfig, every field with its help.
* ``fingerprint``: the digest of what decides the weights (keys resume and the output folder).
* ``records``: the output folder's layout, TrainingResult, checkpoints, finished-run lookup.
* ``data``: the train/validation Parquet as datasets.
* ``device``: what this machine can run (bf16, batching mode, token budget, attention kernel).
* ``model``: the base model plus LoRA / QLoRA / freezing.
* ``batching``: padded micro-batches split into row groups of similar length within a token budget.
* ``loss``: the CPU LM head that projects only the labeled positions.
* ``mlflow_run``, ``callbacks``, ``performance``: tracking, per-step logging, memory (per step and
  per run, the training heap) and MFU.
* ``trainer``: build_trainer (TRL's SFTTrainer plus the above) and train.
* ``launch``, ``pipes``, ``cli``: starting the process(es), reporting to Dagster, the command line.
* ``distributed``, ``cluster``, ``ray_train``: data-parallel ranks (same weights on every rank), what a
  cluster's storage must be, and the Ray job's driver and Ray Train workers (launcher 'ray').
"""

from sft_pipeline.training.cli import main
from sft_pipeline.training.cluster import check_cluster_storage, filesystem_type, node_local_paths
from sft_pipeline.training.config import (
    BATCHING_MODES,
    LAUNCHERS,
    LR_SCHEDULERS,
    PLANNED_METHODS,
    SUPPORTED_METHODS,
    TrainingConfig,
)
from sft_pipeline.training.batching import plan_row_groups, split_padded_batch
from sft_pipeline.training.data import load_tokenized_splits
from sft_pipeline.training.device import (
    check_device_support,
    resolve_attn_implementation,
    resolve_batching,
    resolve_max_batch_tokens,
    uses_cpu,
)
from sft_pipeline.training.distributed import replica_digests, weights_digest, world_rank
from sft_pipeline.training.fingerprint import (
    NON_TRAINING_FIELDS,
    dataset_content_hash,
    model_identity_hash,
    training_fingerprint,
)
from sft_pipeline.training.launch import launch_command, ray_job_params
from sft_pipeline.training.loss import compact_lm_head
from sft_pipeline.training.model import count_parameters, freeze_all_but_last_layers, load_model
from sft_pipeline.training.performance import (
    MEMORY,
    PEAK_BF16_FLOPS,
    bound_kernel_caches,
    lean_heap,
    model_flops_utilization,
    peak_memory_mib,
    step_peak_growth_mib,
)
from sft_pipeline.training.pipes import materialization_metadata
from sft_pipeline.training.records import (
    ADAPTER_SUBDIR,
    CHECKPOINT_SUBDIR,
    FINGERPRINT_FILE,
    FULL_MODEL_SUBDIR,
    MLFLOW_RUN_FILE,
    RECORD_FILE,
    TrainingResult,
    find_finished_run,
    last_complete_checkpoint,
)
from sft_pipeline.training.trainer import build_trainer, train

__all__ = [
    "ADAPTER_SUBDIR",
    "BATCHING_MODES",
    "CHECKPOINT_SUBDIR",
    "FINGERPRINT_FILE",
    "FULL_MODEL_SUBDIR",
    "LAUNCHERS",
    "LR_SCHEDULERS",
    "MEMORY",
    "MLFLOW_RUN_FILE",
    "NON_TRAINING_FIELDS",
    "PEAK_BF16_FLOPS",
    "PLANNED_METHODS",
    "RECORD_FILE",
    "SUPPORTED_METHODS",
    "TrainingConfig",
    "TrainingResult",
    "bound_kernel_caches",
    "build_trainer",
    "check_cluster_storage",
    "check_device_support",
    "compact_lm_head",
    "count_parameters",
    "dataset_content_hash",
    "filesystem_type",
    "find_finished_run",
    "freeze_all_but_last_layers",
    "last_complete_checkpoint",
    "launch_command",
    "lean_heap",
    "load_model",
    "load_tokenized_splits",
    "main",
    "materialization_metadata",
    "model_flops_utilization",
    "model_identity_hash",
    "node_local_paths",
    "peak_memory_mib",
    "plan_row_groups",
    "ray_job_params",
    "replica_digests",
    "resolve_attn_implementation",
    "resolve_batching",
    "resolve_max_batch_tokens",
    "split_padded_batch",
    "step_peak_growth_mib",
    "train",
    "training_fingerprint",
    "uses_cpu",
    "weights_digest",
    "world_rank",
]
