"""The synthetic_instructions asset called directly (moved from tests/test_augmentation.py)."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd

from sft_pipeline import schema
from tests.unit.augmentation.helpers import ChatServer, seed_frame, self_instruct_server_reply


def _prepare_storage(tmp_path):
    from sft_pipeline.resources import PipelineStorage

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    schema.write_rows(seed_frame(), storage.asset_dir("clean_instructions") / "rows.parquet")
    pd.DataFrame({"question": ["What is the boiling point of water at sea level?"], "subject": ["chemistry"]}).to_parquet(
        storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    return storage


def test_asset_with_http_backend_reports_metadata_and_reuses(tmp_path, monkeypatch):
    from sft_pipeline.assets.augmentation import SyntheticInstructionsConfig, synthetic_instructions

    storage = _prepare_storage(tmp_path)
    monkeypatch.setenv("SFT_TEST_ASSET_KEY", "sk-asset")
    with ChatServer(reply=self_instruct_server_reply) as server:
        config = SyntheticInstructionsConfig(
            num_instructions=3, batch_size=2, seed_tasks_per_prompt=4,
            teacher={"backend": "openai", "base_url": server.base_url, "model": "strong", "api_key_env": "SFT_TEST_ASSET_KEY",
                     "backoff_s": 0.01},
        )
        result = synthetic_instructions(dg.build_asset_context(), config, storage)
        sent = len(server.requests)
        assert all(h["Authorization"] == "Bearer sk-asset" for h in server.headers)
        monkeypatch.delenv("SFT_TEST_ASSET_KEY")  # a replay needs no key: the teacher is never built
        again = synthetic_instructions(dg.build_asset_context(), config, storage)
        assert len(server.requests) == sent
    md = result.metadata
    rows = schema.read_rows(md["path"].path)
    assert len(rows) == md["dagster/row_count"] == 3
    assert result.data_version is not None and result.data_version == again.data_version
    assert md["teacher"] == "strong" and md["teacher_backend"] == "openai"
    assert again.metadata["new_teacher_calls"] == 0 and again.metadata["reused_rounds"] >= 1
    assert "rouge_l_novelty" in md["acceptance_per_filter"].value
    assert "sk-asset" not in json.dumps({k: str(v) for k, v in md.items()})
    assert storage.read_manifest("synthetic_instructions")["rows"] == 3
