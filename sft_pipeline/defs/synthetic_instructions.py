"""Self-Instruct augmentation: `synthetic_instructions`.

The teacher backend is chosen in the asset's own config (`teacher:` block): the local base model
(default), any Hugging Face model, or an OpenAI-compatible endpoint whose API key is read at run time
from the environment variable named by `teacher.api_key_env` (never from config or metadata).
"""

import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.augmentation import SelfInstructConfig, generate_synthetic_instructions
from sft_pipeline.augmentation.teachers import TeacherConfig, build_teacher, teacher_identity
from sft_pipeline.defs.metadata import config_from_dataclass, counts_table, domain_kwargs, markdown_table
from sft_pipeline.defs.resources import PipelineStorage
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.outputs import (
    QUESTIONS_FILE,
    REJECTED_FILE,
    ROWS_FILE,
    CleanInstructionsInfo,
    MmluBenchmarkInfo,
    SyntheticInstructionsInfo,
    read_table,
    write_row_tables,
)

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
CODE_VERSION = "3"


@dg.asset(code_version=CODE_VERSION, group_name="data", kinds={"pytorch", "parquet"})
def synthetic_instructions(
    context: dg.AssetExecutionContext, config: SyntheticInstructionsConfig, storage: PipelineStorage,
    clean_instructions: CleanInstructionsInfo, base_model: BaseModelInfo, mmlu_benchmark: MmluBenchmarkInfo,
) -> dg.MaterializeResult[SyntheticInstructionsInfo]:
    """Self-Instruct rows grown from the clean seed pool by a teacher model, filtered, with per-row provenance."""
    cfg = SelfInstructConfig(**domain_kwargs(config, SelfInstructConfig))
    teacher_cfg = TeacherConfig(**config.teacher.model_dump())
    seeds = read_table(clean_instructions, ROWS_FILE)
    benchmark = pd.read_parquet(mmlu_benchmark.file(QUESTIONS_FILE))
    local_dir = base_model.path if teacher_cfg.backend == "local" else None

    # The teacher is built only when a round must really be generated: a run that replays its journal
    # loads no model and needs no API key.
    accepted, rejected, stats = generate_synthetic_instructions(
        seeds, None, cfg,
        benchmark_questions=benchmark["question"].tolist(),
        cache_dir=storage.asset_dir("synthetic_instructions") / "journal",
        progress=lambda p: context.log.info("self-instruct round %(round)s (%(reused)s): %(accepted)s accepted, %(attempts)s calls" % {**p, "reused": "reused" if p["reused"] else "generated"}),
        teacher_id=teacher_identity(teacher_cfg, local_dir),
        teacher_factory=lambda: build_teacher(teacher_cfg, local_dir),
    )
    context.log.info("self-instruct: %s", {k: v for k, v in stats.items() if k != "filters"})
    folder, digest = write_row_tables(storage.asset_dir("synthetic_instructions"), {ROWS_FILE: accepted, REJECTED_FILE: rejected})
    info = SyntheticInstructionsInfo(
        path=str(folder), digest=digest, files=(ROWS_FILE, REJECTED_FILE), rows=len(accepted), rejected=len(rejected),
        generation_key=str(stats.get("generation_key") or ""), journal=str(stats.get("journal") or ""),
    )
    preview_columns = [c for c in ("instance_order", "prompt", "response", "rouge_l_max") if c in accepted.columns]
    filters = pd.DataFrame(stats.get("filters") or [], columns=["filter", "checked", "rejected", "pass_rate"])
    candidates = stats.get("candidates", 0)
    return dg.MaterializeResult(
        value=info,
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
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
            "generation_key": info.generation_key,
            "journal": dg.MetadataValue.path(info.journal) if info.journal else "none",
            "samples": markdown_table(accepted[preview_columns], max_rows=10, max_chars=200),
        },
        data_version=dg.DataVersion(digest),
    )
