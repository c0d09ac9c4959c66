"""Ingestion and curation: `raw_instructions`, `clean_instructions`, `rejected_instructions`, and their checks."""


import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.defs.metadata import (
    config_from_dataclass,
    counts_table,
    domain_kwargs,
    histogram,
    markdown_table,
    suite_check_result,
)
from sft_pipeline.curation import CurationConfig, clean_instructions as clean_rows, redact_columns, redact_value, screen_rows
from sft_pipeline.ingest import DEFAULT_MAX_RECORD_CHARS, SourceSpec, default_sources, load_sources
from sft_pipeline.curation.expectations import conversation_view, curation_summary, ingest_summary, suite_path, validate_frame
from sft_pipeline.defs.resources import PipelineStorage
from sft_pipeline.outputs import (
    QUESTIONS_FILE,
    ROWS_FILE,
    UNREADABLE_FILE,
    CleanInstructionsInfo,
    MmluBenchmarkInfo,
    RawInstructionsInfo,
    RejectedInstructionsInfo,
    read_table,
    write_row_tables,
)

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "4"
GROUP = "data"


class SourceConfig(dg.Config):
    """One input source."""

    path: str = pydantic.Field(description="A file (JSONL, JSON, CSV, Parquet), a glob, a save_to_disk folder, or hf://org/name.")
    shape: str = pydantic.Field(default="auto", description="auto | alpaca | dolly | sharegpt | messages | prompt_completion")
    name: str | None = pydantic.Field(default=None, description="Source name on each row; defaults to the file or dataset name.")
    split: str = pydantic.Field(default="train", description="Dataset split, for Hugging Face datasets.")
    revision: str | None = pydantic.Field(default=None, description="Dataset revision, for hf:// datasets.")
    columns: dict[str, str] = pydantic.Field(default_factory=dict, description="Canonical field -> column name in this source.")


class RawInstructionsConfig(dg.Config):
    """Which sources to read."""

    sources: list[SourceConfig] = pydantic.Field(
        default_factory=list, description="Input sources; empty means the seed instruction set shipped in the package."
    )
    max_record_chars: int = pydantic.Field(
        default=DEFAULT_MAX_RECORD_CHARS,
        description="A record with more characters of text (a JSONL line with more bytes) is rejected unparsed as oversized_record.",
    )


CleanInstructionsConfig = config_from_dataclass(CurationConfig, "CleanInstructionsConfig")


def _per_source_table(records: dict[str, int], rows: pd.DataFrame, rejected: pd.DataFrame) -> dg.MetadataValue:
    kept = rows["source"].value_counts().to_dict() if len(rows) else {}
    dropped = rejected["source"].value_counts().to_dict() if len(rejected) else {}
    frame = pd.DataFrame(
        [{"source": name, "records": count, "rows": kept.get(name, 0), "rejected": dropped.get(name, 0)} for name, count in records.items()]
    )
    return markdown_table(frame, max_rows=100)


# Metadata lands in the Dagster event log, which everyone with the UI reads and which outlives the
# data folders: text shown there is always redacted, whatever the curation `pii` setting.
def _reject_samples(rejected: pd.DataFrame, per_reason: int = 2, max_rows: int = 30) -> dg.MetadataValue:
    """A few rejected rows of every reason, so each reason has an example; text redacted."""
    if not len(rejected):
        return dg.MetadataValue.md("_(empty)_")
    sample = rejected.groupby("reason", sort=True, group_keys=False).head(per_reason)
    sample = redact_columns(sample[["source", "source_index", "stage", "reason", "detail", "raw"]].head(max_rows), ("detail", "raw"))
    return markdown_table(sample, max_rows=max_rows, max_chars=160)


def _preview(rows: pd.DataFrame, max_rows: int = 10) -> dg.MetadataValue:
    """The first rows, text redacted."""
    head = rows[["id", "source", "category", "prompt", "response"]].head(max_rows)
    return markdown_table(redact_columns(head, ("category", "prompt", "response")), max_rows=max_rows)


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pandas", "parquet"})
def raw_instructions(config: RawInstructionsConfig, storage: PipelineStorage) -> dg.MaterializeResult[RawInstructionsInfo]:
    """Every source record mapped to the canonical row schema, with provenance; unreadable records set aside."""
    specs = [SourceSpec(**source.model_dump()) for source in config.sources] or default_sources()
    result = load_sources(specs, max_record_chars=config.max_record_chars)
    # Rows the blocking raw_instructions suite would reject are set aside here, one by one, instead
    # of failing the check (and the run) for every record.
    rows, screened = screen_rows(result.rows, suite_path("raw_instructions"))
    set_aside = pd.concat([result.rejected, screened], ignore_index=True) if len(screened) else result.rejected
    folder, digest = write_row_tables(storage.asset_dir("raw_instructions"), {ROWS_FILE: rows, UNREADABLE_FILE: set_aside})
    info = RawInstructionsInfo(path=str(folder), digest=digest, files=(ROWS_FILE, UNREADABLE_FILE), rows=len(rows),
                               unreadable=len(set_aside), records_per_source=dict(result.records_per_source))
    reasons = set_aside["reason"].value_counts().to_dict() if len(set_aside) else {}
    return dg.MaterializeResult(
        value=info,
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "dagster/row_count": info.rows,
            "records_read": info.records_read,
            "unreadable_records": info.unreadable,
            "records_per_source": _per_source_table(result.records_per_source, rows, set_aside),
            "unreadable_per_reason": counts_table(reasons, "reason", "records"),
            "unreadable_sample": _reject_samples(set_aside),
            "preview": _preview(rows),
        },
        data_version=dg.DataVersion(digest),
    )


@dg.multi_asset(
    group_name=GROUP,
    code_version=CODE_VERSION,
    outs={
        "clean_instructions": dg.AssetOut(kinds={"pandas", "parquet"}, description="Normalized, filtered, deduplicated, decontaminated rows."),
        "rejected_instructions": dg.AssetOut(kinds={"pandas", "parquet"}, description="Every record that did not make it, with source, position and reason."),
    },
)
def curated_instructions(
    context: dg.AssetExecutionContext, config: CleanInstructionsConfig, storage: PipelineStorage,
    raw_instructions: RawInstructionsInfo, mmlu_benchmark: MmluBenchmarkInfo,
):
    """Clean the raw rows; rows that fail, and records ingestion could not read, go to `rejected_instructions`."""
    raw = read_table(raw_instructions, ROWS_FILE)
    ingest_rejected = read_table(raw_instructions, UNREADABLE_FILE)
    benchmark = pd.read_parquet(mmlu_benchmark.file(QUESTIONS_FILE))
    benchmark_texts = [(q.question_id, q.question + "\n" + "\n".join(q.choices)) for q in benchmark.itertuples()]

    cfg = CurationConfig(**domain_kwargs(config, CurationConfig))
    kept, rejected, report = clean_rows(raw, cfg, benchmark_texts)
    if cfg.pii != "keep":  # set-aside records keep their raw text for review, not the personal data in it
        ingest_rejected = redact_columns(ingest_rejected, ("detail", "raw"))
    context.log.info("curation: %d in, %d kept, rejected %s, phases %s", report.rows_in, report.kept, report.rejected_by_reason, report.seconds_per_phase)
    all_rejected = pd.concat([ingest_rejected, rejected], ignore_index=True) if len(ingest_rejected) else rejected
    records_in = raw_instructions.records_read
    clean_folder, clean_digest = write_row_tables(storage.asset_dir("clean_instructions"), {ROWS_FILE: kept})
    rejected_folder, rejected_digest = write_row_tables(storage.asset_dir("rejected_instructions"), {ROWS_FILE: all_rejected})
    clean = CleanInstructionsInfo(path=str(clean_folder), digest=clean_digest, files=(ROWS_FILE,), rows=len(kept), records_in=records_in)
    rejected_info = RejectedInstructionsInfo(path=str(rejected_folder), digest=rejected_digest, files=(ROWS_FILE,), rows=len(all_rejected))

    category_balance = kept["category"].fillna("(none)").value_counts() if len(kept) else pd.Series(dtype=int)
    balance = pd.DataFrame({"category": category_balance.index, "rows": category_balance.values,
                            "share": (category_balance.values / max(len(kept), 1)).round(3)})
    chars = [sum(len(m["content"]) for m in turns) for turns in kept["messages"]]
    yield dg.MaterializeResult(
        value=clean,
        asset_key="clean_instructions",
        metadata={
            "path": dg.MetadataValue.path(str(clean_folder)),
            "dagster/row_count": len(kept),
            "records_in": records_in,
            "rejected": len(all_rejected),
            "kept_share": round(len(kept) / records_in, 4) if records_in else 0.0,
            "kept_per_source": counts_table(kept["source"].value_counts().to_dict() if len(kept) else {}, "source", "rows"),
            "category_balance": markdown_table(balance, max_rows=100),
            "conversation_chars": histogram(chars, "Conversation length", "characters") if chars else dg.MetadataValue.md("_(empty)_"),
            "conversation_tokens": histogram(report.kept_tokens, f"Conversation length ({report.token_counter} tokens)", "tokens")
            if report.kept_tokens else dg.MetadataValue.md("_(empty)_"),
            "token_counter": report.token_counter,
            "pii_redactions": dg.MetadataValue.json(report.redactions),
            "lsh_bands_x_rows": f"{report.lsh_bands[0]} x {report.lsh_bands[1]}",
            "near_dedup_candidate_rows": report.near_dedup_candidates,
            "seconds_per_phase": dg.MetadataValue.json(report.seconds_per_phase),
        },
        data_version=dg.DataVersion(clean_digest),
    )
    reasons = all_rejected["reason"].value_counts().to_dict() if len(all_rejected) else {}
    by_source_reason = (
        all_rejected.groupby(["source", "stage", "reason"], dropna=False).size().reset_index(name="rows")
        if len(all_rejected) else pd.DataFrame(columns=["source", "stage", "reason", "rows"])
    )
    yield dg.MaterializeResult(
        value=rejected_info,
        asset_key="rejected_instructions",
        metadata={
            "path": dg.MetadataValue.path(str(rejected_folder)),
            "dagster/row_count": len(all_rejected),
            "rejected_per_reason": counts_table(reasons, "reason", "rows"),
            "rejected_per_source": counts_table(all_rejected["source"].value_counts().to_dict() if len(all_rejected) else {}, "source", "rows"),
            "rejected_per_source_and_reason": markdown_table(by_source_reason, max_rows=100),
            "sample": _reject_samples(all_rejected),
        },
        data_version=dg.DataVersion(rejected_digest),
    )


def _redacted(result):
    """A suite result whose observed values (samples of failing cells) are redacted, for the event log."""
    for outcome in result.outcomes:
        outcome.observed = redact_value(outcome.observed)
    return result


@dg.asset_check(asset="raw_instructions", blocking=True, description="Ingested rows match the raw_instructions suite.")
def raw_instructions_match_expectations(raw_instructions: RawInstructionsInfo) -> dg.AssetCheckResult:
    rows = read_table(raw_instructions, ROWS_FILE)
    return suite_check_result(_redacted(validate_frame(conversation_view(rows), suite_path("raw_instructions"))), "raw_instructions")


@dg.asset_check(
    asset="raw_instructions",
    blocking=True,
    description="Records read = rows + unreadable records, and the unreadable share is within the ingest_summary suite's bound.",
)
def raw_records_readable(raw_instructions: RawInstructionsInfo) -> dg.AssetCheckResult:
    rows = len(pd.read_parquet(raw_instructions.file(ROWS_FILE), columns=["id"]))
    unreadable = len(pd.read_parquet(raw_instructions.file(UNREADABLE_FILE), columns=["reason"]))
    return suite_check_result(
        validate_frame(ingest_summary(rows + unreadable, rows, unreadable), suite_path("ingest_summary")),
        "raw_instructions",
        rows=rows,
        unreadable=unreadable,
    )


@dg.asset_check(asset="clean_instructions", blocking=True, description="Clean rows match the clean_instructions suite.")
def clean_instructions_match_expectations(clean_instructions: CleanInstructionsInfo) -> dg.AssetCheckResult:
    rows = read_table(clean_instructions, ROWS_FILE)
    return suite_check_result(_redacted(validate_frame(conversation_view(rows), suite_path("clean_instructions"))), "clean_instructions")


@dg.asset_check(
    asset="clean_instructions",
    blocking=True,
    description="Every record read is either kept or rejected, and the rejected share is within the curation_summary suite's bound.",
    additional_ins={"raw_instructions": dg.AssetIn("raw_instructions"), "rejected_instructions": dg.AssetIn("rejected_instructions")},
)
def every_record_accounted_for(
    clean_instructions: CleanInstructionsInfo, raw_instructions: RawInstructionsInfo, rejected_instructions: RejectedInstructionsInfo
) -> dg.AssetCheckResult:
    # Counted from the files, not from the hand-offs' counts: the check must see what was written.
    records_in = len(pd.read_parquet(raw_instructions.file(ROWS_FILE), columns=["id"])) + len(
        pd.read_parquet(raw_instructions.file(UNREADABLE_FILE), columns=["reason"])
    )
    kept = len(pd.read_parquet(clean_instructions.file(ROWS_FILE), columns=["id"]))
    rejected = len(pd.read_parquet(rejected_instructions.file(ROWS_FILE), columns=["reason"]))
    return suite_check_result(
        validate_frame(curation_summary(records_in, kept, rejected), suite_path("curation_summary")),
        "clean_instructions",
        records_in=records_in,
        kept=kept,
        rejected=rejected,
    )
