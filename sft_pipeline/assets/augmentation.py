"""Self-Instruct augmentation: `synthetic_instructions`."""


import dagster as dg
import pandas as pd

from sft_pipeline.assets.support import config_from_dataclass, counts_table, domain_kwargs, markdown_table
from sft_pipeline.augmentation import LocalHFTeacher, SelfInstructConfig, generate_synthetic_instructions
from sft_pipeline.resources import PipelineStorage
from sft_pipeline.schema import read_rows, write_rows

SyntheticInstructionsConfig = config_from_dataclass(SelfInstructConfig, "SyntheticInstructionsConfig")

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"


@dg.asset(code_version=CODE_VERSION, group_name="data", kinds={"pytorch", "parquet"}, deps=["clean_instructions", "base_model", "mmlu_benchmark"])
def synthetic_instructions(context: dg.AssetExecutionContext, config: SyntheticInstructionsConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """Self-Instruct rows written by the base model as teacher from the clean seed pool, with provenance."""
    cfg = SelfInstructConfig(**domain_kwargs(config, SelfInstructConfig))
    seeds = read_rows(storage.asset_dir("clean_instructions") / "rows.parquet")
    benchmark = pd.read_parquet(storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    # Loading the teacher costs seconds; skip it when no rows are asked for.
    teacher = LocalHFTeacher(storage.read_manifest("base_model")["path"]) if cfg.num_instructions > 0 else None
    accepted, rejected, stats = generate_synthetic_instructions(seeds, teacher, cfg, benchmark_questions=benchmark["question"].tolist())
    context.log.info("self-instruct: %s", stats)
    folder = storage.asset_dir("synthetic_instructions")
    path = write_rows(accepted, folder / "rows.parquet")
    write_rows(rejected, folder / "rejected.parquet")
    preview_columns = [c for c in ("id", "prompt", "response", "rouge_l_max") if c in accepted.columns]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": len(accepted),
            "attempts": stats.get("attempts", 0),
            "candidates": stats.get("candidates", 0),
            "rejected": len(rejected),
            "acceptance_rate": (len(accepted) / stats["candidates"]) if stats.get("candidates") else 0.0,
            "rejected_per_filter": counts_table(stats.get("rejected_by_reason", {}), "filter", "candidates"),
            "teacher": str(stats.get("teacher")),
            "samples": markdown_table(accepted[preview_columns], max_rows=10, max_chars=200),
        }
    )
