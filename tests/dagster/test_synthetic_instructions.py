"""The synthetic_instructions asset called directly on typed hand-offs: an HTTP teacher, metadata, reuse of its journal."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd

from sft_pipeline import schema
from sft_pipeline.defs.resources import PipelineStorage
from sft_pipeline.defs.synthetic_instructions import SyntheticInstructionsConfig, synthetic_instructions
from sft_pipeline.outputs import QUESTIONS_FILE, ROWS_FILE, CleanInstructionsInfo, MmluBenchmarkInfo, write_output_folder
from tests.dagster.conftest import base_model_info, row_tables_info
from tests.unit.augmentation.helpers import ChatServer, seed_frame, self_instruct_server_reply


def _prepare_upstream(tmp_path):
    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    clean = row_tables_info(CleanInstructionsInfo, storage, "clean_instructions", seed_frame())
    questions = pd.DataFrame({"question": ["What is the boiling point of water at sea level?"], "subject": ["chemistry"]})

    def write(folder):
        questions.to_parquet(folder / QUESTIONS_FILE)
        return [QUESTIONS_FILE]

    folder, digest = write_output_folder(storage.asset_dir("mmlu_benchmark"), write)
    benchmark = MmluBenchmarkInfo(path=str(folder), digest=digest, files=(QUESTIONS_FILE,), questions=1)
    return storage, clean, benchmark


def test_asset_with_http_backend_reports_metadata_and_reuses(tmp_path, monkeypatch):
    storage, clean, benchmark = _prepare_upstream(tmp_path)
    base = base_model_info(tmp_path / "unused-local-teacher")
    monkeypatch.setenv("SFT_TEST_ASSET_KEY", "sk-asset")
    with ChatServer(reply=self_instruct_server_reply) as server:
        config = SyntheticInstructionsConfig(
            num_instructions=3, batch_size=2, seed_tasks_per_prompt=4,
            teacher={"backend": "openai", "base_url": server.base_url, "model": "strong", "api_key_env": "SFT_TEST_ASSET_KEY",
                     "backoff_s": 0.01},
        )
        result = synthetic_instructions(dg.build_asset_context(), config, storage, clean, base, benchmark)
        sent = len(server.requests)
        assert all(h["Authorization"] == "Bearer sk-asset" for h in server.headers)
        monkeypatch.delenv("SFT_TEST_ASSET_KEY")  # a replay needs no key: the teacher is never built
        again = synthetic_instructions(dg.build_asset_context(), config, storage, clean, base, benchmark)
        assert len(server.requests) == sent
    md = result.metadata
    rows = schema.read_rows(result.value.file(ROWS_FILE))
    assert len(rows) == md["dagster/row_count"] == 3
    assert result.data_version is not None and result.data_version == again.data_version
    assert md["teacher"] == "strong" and md["teacher_backend"] == "openai"
    assert again.metadata["new_teacher_calls"] == 0 and again.metadata["reused_rounds"] >= 1
    assert "rouge_l_novelty" in md["acceptance_per_filter"].value
    assert "sk-asset" not in json.dumps({k: str(v) for k, v in md.items()})
    assert result.value.rows == again.value.rows == 3 and result.value.path == again.value.path
