"""Templating and tokenization: `sft_dataset`, and the blocking round-trip checks that guard training."""

import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.augmentation import mix_human_and_synthetic
from sft_pipeline.defs.metadata import config_from_dataclass, counts_table, domain_kwargs
from sft_pipeline.defs.resources import PipelineStorage
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.outputs import ROWS_FILE, CleanInstructionsInfo, SyntheticInstructionsInfo, read_table
from sft_pipeline.tokenization import CHECK_NAMES, SftDatasetInfo, TokenizationConfig, materialize_sft_dataset, verify_sft_dataset

SftDatasetConfig = config_from_dataclass(
    TokenizationConfig,
    "SftDatasetConfig",
    synthetic_ratio=(
        float | None,
        pydantic.Field(
            default=None,
            description="Share of synthetic rows in the mix, in [0, 1] (0.25: one synthetic row per three human ones); "
            "empty keeps every synthetic row.",
        ),
    ),
    mix_seed=(int, pydantic.Field(default=0, description="Seed of the synthetic sample when synthetic_ratio is set.")),
)

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "3"

CHECK_DESCRIPTIONS = {
    "every_example_trainable": "Every example has at least one trainable (labeled) token.",
    "labels_round_trip": "Decoding the labeled spans gives back every assistant turn's content (whitespace aside), "
                         "each followed by the end-of-turn/EOS token.",
    "no_double_bos": "No example starts with (or holds) a doubled BOS; tokenizers that expect a BOS get exactly one.",
    "eos_never_masked": "The EOS closing every assistant turn is labeled, even when the pad token is the EOS.",
}


def input_rows(clean: CleanInstructionsInfo, synthetic: SyntheticInstructionsInfo, synthetic_ratio: float | None,
               seed: int) -> tuple[pd.DataFrame, int, int]:
    """Clean human rows plus synthetic rows (all of them, or a sample making up `synthetic_ratio`)."""
    human = read_table(clean, ROWS_FILE)
    synthetic_rows = read_table(synthetic, ROWS_FILE)
    if synthetic_ratio is not None:
        rows = mix_human_and_synthetic(human, synthetic_rows, synthetic_ratio, seed)
        synthetic_used = int((rows["origin"] == "synthetic").sum()) if len(rows) else 0
        return rows, len(rows) - synthetic_used, synthetic_used
    rows = pd.concat([human, synthetic_rows], ignore_index=True) if len(synthetic_rows) else human
    return rows, len(human), len(synthetic_rows)


@dg.asset(code_version=CODE_VERSION, group_name="data", kinds={"huggingface", "parquet"})
def sft_dataset(
    context: dg.AssetExecutionContext, config: SftDatasetConfig, storage: PipelineStorage,
    clean_instructions: CleanInstructionsInfo, synthetic_instructions: SyntheticInstructionsInfo, base_model: BaseModelInfo,
) -> dg.MaterializeResult[SftDatasetInfo]:
    """Human and synthetic rows rendered with the chat template, tokenized with assistant-only labels, split to
    Parquet; reused without tokenizing when rows, tokenizer, template and settings are unchanged."""
    rows, human_rows, synthetic_rows = input_rows(clean_instructions, synthetic_instructions, config.synthetic_ratio, config.mix_seed)
    cfg = TokenizationConfig(**domain_kwargs(config, TokenizationConfig))
    info = materialize_sft_dataset(rows[["id", "messages"]], base_model.path, storage.asset_dir("sft_dataset"), cfg)
    context.log.info("sft_dataset %s at %s: %s", "reused" if info.reused else "built", info.path, info.splits)
    metadata = {
        "path": dg.MetadataValue.path(str(info.path)),
        "dagster/row_count": sum(info.splits.values()),
        "reused": info.reused,
        "fingerprint": info.fingerprint,
        "content_hash": info.content_hash,
        "splits": counts_table(info.splits, "split", "rows"),
        "rows_in": info.rows_in,
        "human_rows": human_rows,
        "synthetic_rows": synthetic_rows,
        "num_tokens": info.num_tokens,
        "trainable_tokens": info.trainable_tokens,
        "trainable_token_share": info.trainable_token_share,
        "truncated": info.truncated,
        "dropped": info.dropped,
        "dropped_reasons": counts_table(info.dropped_reasons, "reason", "rows"),
        "max_length": info.max_length,
        "truncation": info.truncation,
        "template": info.template_name,
        "system_prompt": info.system_prompt or "",
        "end_of_turn_tokens": counts_table(info.end_of_turn_tokens, "token", "assistant turns"),
        "eos_token": info.eos_token or "",
        "pad_token": info.pad_token or "",
        "bos_prefix": dg.MetadataValue.json(info.bos_prefix),
        "token_length_histogram": counts_table(info.length_histogram, "tokens", "rows"),
        "pack_length": info.pack_length,
        "packing_efficiency": info.packing_efficiency,
        "packed_sequences": dg.MetadataValue.json(info.packed_sequences),
        "fast_path_rows": info.fast_path_rows,
        "slow_path_rows": info.slow_path_rows,
        "template_verbatim": info.template_verbatim,
        "tokenize_seconds": info.seconds,
        "tokens_per_second": info.tokens_per_second,
    }
    return dg.MaterializeResult(value=info, metadata=metadata, data_version=dg.DataVersion(info.content_hash))


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(name, asset="sft_dataset", blocking=True, description=CHECK_DESCRIPTIONS[name],
                             additional_deps=["clean_instructions", "synthetic_instructions", "base_model"])
           for name in CHECK_NAMES],
    ins={
        "sft_dataset": dg.AssetIn("sft_dataset"),
        "clean_instructions": dg.AssetIn("clean_instructions"),
        "synthetic_instructions": dg.AssetIn("synthetic_instructions"),
        "base_model": dg.AssetIn("base_model"),
    },
)
def sft_dataset_round_trip(
    sft_dataset: SftDatasetInfo, clean_instructions: CleanInstructionsInfo,
    synthetic_instructions: SyntheticInstructionsInfo, base_model: BaseModelInfo,
):
    """Re-read the written Parquet and prove it trains what it should (see CHECK_DESCRIPTIONS)."""
    # Every upstream row, whatever the mix: verification looks each dataset row up by id.
    rows, _, _ = input_rows(clean_instructions, synthetic_instructions, synthetic_ratio=None, seed=0)
    outcomes = verify_sft_dataset(sft_dataset, base_model.path, rows[["id", "messages"]])
    for name in CHECK_NAMES:
        outcome = outcomes[name]
        metadata = {"checked_rows": outcome.checked, "failed_rows": outcome.failures, **outcome.extra}
        if outcome.examples:
            metadata["failures"] = dg.MetadataValue.json(outcome.examples)
        yield dg.AssetCheckResult(
            asset_key="sft_dataset",
            check_name=name,
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={k: (dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else ("" if v is None else v))
                      for k, v in metadata.items()},
            description=outcome.description,
        )
