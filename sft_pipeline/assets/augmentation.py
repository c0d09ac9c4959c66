"""Self-Instruct augmentation: `synthetic_instructions`.

The teacher backend is chosen in the asset's own config (`teacher:` block): the local base model
(default), any Hugging Face model, or an OpenAI-compatible endpoint whose API key is read at run time
from the environment variable named by `teacher.api_key_env` (never from config or metadata).
"""

import hashlib
from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.assets.support import config_from_dataclass, counts_table, domain_kwargs, markdown_table
from sft_pipeline.augmentation import SelfInstructConfig, generate_synthetic_instructions
from sft_pipeline.resources import PipelineStorage
from sft_pipeline.schema import read_rows, write_rows
from sft_pipeline.teachers import TeacherConfig, build_teacher, teacher_identity

TeacherBackendConfig = config_from_dataclass(TeacherConfig, "TeacherBackendConfig")
SyntheticInstructionsConfig = config_from_dataclass(
    SelfInstructConfig,
    "SyntheticInstructionsConfig",
    teacher=(
        TeacherBackendConfig,
        pydantic.Field(default_factory=TeacherBackendConfig, description="The teacher model and how to reach it (backend: local | hf | openai)."),
    ),
)

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "2"


def _rows_version(rows: pd.DataFrame) -> str:
    """Content hash of the accepted rows: their ids hash the conversations, in output order."""
    return hashlib.sha256("\n".join(rows["id"].astype(str)).encode("utf-8")).hexdigest()[:16] if len(rows) else "empty"


@dg.asset(code_version=CODE_VERSION, group_name="data", kinds={"pytorch", "parquet"}, deps=["clean_instructions", "base_model", "mmlu_benchmark"])
def synthetic_instructions(context: dg.AssetExecutionContext, config: SyntheticInstructionsConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """Self-Instruct rows grown from the clean seed pool by a teacher model, filtered, with per-row provenance."""
    cfg = SelfInstructConfig(**domain_kwargs(config, SelfInstructConfig))
    teacher_cfg = TeacherConfig(**config.teacher.model_dump())
    seeds = read_rows(storage.asset_dir("clean_instructions") / "rows.parquet")
    benchmark = pd.read_parquet(storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    folder = storage.asset_dir("synthetic_instructions")
    local_dir = storage.read_manifest("base_model")["path"] if teacher_cfg.backend == "local" else None

    # The teacher is built only when a round must really be generated: a run that replays its journal
    # loads no model and needs no API key.
    accepted, rejected, stats = generate_synthetic_instructions(
        seeds, None, cfg,
        benchmark_questions=benchmark["question"].tolist(),
        cache_dir=folder / "journal",
        progress=lambda p: context.log.info("self-instruct round %(round)s (%(reused)s): %(accepted)s accepted, %(attempts)s calls" % {**p, "reused": "reused" if p["reused"] else "generated"}),
        teacher_id=teacher_identity(teacher_cfg, local_dir),
        teacher_factory=lambda: build_teacher(teacher_cfg, local_dir),
    )
    context.log.info("self-instruct: %s", {k: v for k, v in stats.items() if k != "filters"})
    path = write_rows(accepted, folder / "rows.parquet")
    rejected_path = write_rows(rejected, folder / "rejected.parquet")
    version = _rows_version(accepted)
    storage.write_manifest("synthetic_instructions", {
        "path": str(path), "rejected_path": str(rejected_path), "rows": len(accepted), "data_version": version,
        "generation_key": stats.get("generation_key"), "journal": stats.get("journal"),
    })
    preview_columns = [c for c in ("instance_order", "prompt", "response", "rouge_l_max") if c in accepted.columns]
    filters = pd.DataFrame(stats.get("filters") or [], columns=["filter", "checked", "rejected", "pass_rate"])
    candidates = stats.get("candidates", 0)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "rejected_path": dg.MetadataValue.path(str(rejected_path)),
            "dagster/row_count": len(accepted),
            "attempts": stats.get("attempts", 0),
            "new_teacher_calls": stats.get("new_calls", 0),
            "reused_rounds": stats.get("reused_rounds", 0),
            "new_rounds": stats.get("new_rounds", 0),
            "candidates": candidates,
            "rejected": len(rejected),
            "stopped": str(stats.get("stopped")),
            "acceptance_rate": round(len(accepted) / candidates, 4) if candidates else 0.0,
            "acceptance_per_filter": markdown_table(filters, max_rows=50),
            "rejected_per_filter": counts_table(stats.get("rejected_by_reason", {}), "reason", "candidates"),
            "teacher": str(stats.get("teacher")),
            "teacher_backend": teacher_cfg.backend,
            "generation_key": str(stats.get("generation_key")),
            "journal": dg.MetadataValue.path(str(stats["journal"])) if stats.get("journal") else "none",
            "samples": markdown_table(accepted[preview_columns], max_rows=10, max_chars=200),
        },
        data_version=dg.DataVersion(version),
    )
