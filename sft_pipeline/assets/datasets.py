"""Templating and tokenization: `sft_dataset`."""


import dagster as dg
import pandas as pd

from sft_pipeline.assets.support import config_from_dataclass, counts_table, domain_kwargs
from sft_pipeline.resources import PipelineStorage
from sft_pipeline.schema import read_rows
from sft_pipeline.tokenization import TokenizationConfig, build_sft_dataset

SftDatasetConfig = config_from_dataclass(TokenizationConfig, "SftDatasetConfig")

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"


@dg.asset(code_version=CODE_VERSION, group_name="data", kinds={"huggingface", "parquet"}, deps=["clean_instructions", "synthetic_instructions", "base_model"])
def sft_dataset(context: dg.AssetExecutionContext, config: SftDatasetConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """Human and synthetic rows rendered with the chat template, tokenized with assistant-only labels, split to Parquet."""
    human = read_rows(storage.asset_dir("clean_instructions") / "rows.parquet")
    synthetic = read_rows(storage.asset_dir("synthetic_instructions") / "rows.parquet")
    rows = pd.concat([human, synthetic], ignore_index=True) if len(synthetic) else human
    info = build_sft_dataset(
        rows,
        storage.read_manifest("base_model")["path"],
        storage.asset_dir("sft_dataset"),
        TokenizationConfig(**domain_kwargs(config, TokenizationConfig)),
    )
    manifest = info.to_dict()
    storage.write_manifest("sft_dataset", manifest)
    context.log.info("sft_dataset splits: %s", info.splits)
    trainable_share = info.trainable_tokens / info.num_tokens if info.num_tokens else 0.0
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(info.path)),
            "dagster/row_count": sum(info.splits.values()),
            "splits": counts_table(info.splits, "split", "rows"),
            "human_rows": len(human),
            "synthetic_rows": len(synthetic),
            "num_tokens": info.num_tokens,
            "trainable_tokens": info.trainable_tokens,
            "trainable_token_share": round(trainable_share, 4),
            "truncated": info.truncated,
            "dropped": info.dropped,
            "max_length": info.max_length,
            "template": info.template_name,
            "token_length_histogram": counts_table(info.length_histogram, "tokens", "rows"),
        }
    )
