"""Fixtures of the Dagster tier: hand-offs made on the spot, and materializing assets over stand-ins of
their upstream assets (same keys, returning prepared hand-offs)."""

from __future__ import annotations

import dagster as dg

from sft_pipeline.definitions import build_definitions
from sft_pipeline.defs.resources import pipeline_resources
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.outputs import ROWS_FILE, write_row_tables


def base_model_info(model_dir) -> BaseModelInfo:
    return BaseModelInfo(path=str(model_dir), source=str(model_dir), revision="tiny-rev", num_parameters=0, dtype="float32",
                         has_chat_template=True, chat_template_source="tokenizer", model_type="llama", content_hash="tiny")


def row_tables_info(cls, storage, asset: str, rows, **fields):
    """A row-table hand-off (`cls`) whose ROWS_FILE holds `rows`, published under the storage root."""
    folder, digest = write_row_tables(storage.asset_dir(asset), {ROWS_FILE: rows})
    return cls(path=str(folder), digest=digest, files=(ROWS_FILE,), rows=len(rows), **fields)


def stub_asset(key: str, value):
    """An asset named `key` that returns `value`: stands in for an upstream asset in a test."""
    @dg.asset(name=key, group_name="stand_ins")
    def _stand_in():
        return value

    return _stand_in


def materialize_with_stubs(keys, stubs: dict, storage, tracking, run_config=None, instance=None, raise_on_error=False):
    """Materialize the pipeline's assets `keys` (with their checks), their upstream assets replaced by `stubs`."""
    defs = build_definitions(storage, tracking)
    wanted = {dg.AssetKey(k) for k in keys}
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and set(a.keys) & wanted]
    checks = [c for c in defs.asset_checks if {k.asset_key for k in c.check_keys} & wanted]
    return dg.materialize(
        [stub_asset(k, v) for k, v in stubs.items()] + assets + checks,
        resources=pipeline_resources(storage, tracking),
        run_config=run_config or {},
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )
