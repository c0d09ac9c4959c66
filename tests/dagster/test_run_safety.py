"""Overlapping runs never mix data, and a killed step never leaves a file that a later step trusts.

The first test interleaves two runs deterministically: run B (other raw data) runs to completion
between run A's `raw_instructions` and the moment A's `clean_instructions` loads its input. The others
SIGKILL a materialization in a child process while it writes a persisted output (mid-file), then show
that what a later step loads is the last recorded, complete output, and that the left-over staging
folder is removed by the next writer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline.definitions import build_definitions
from sft_pipeline.defs.io_manager import HandoffIOManager
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.outputs import ROWS_FILE, STAGING_PREFIX

REPO = Path(__file__).resolve().parents[2]
CURATION = ["raw_instructions", "mmlu_benchmark", "clean_instructions", "rejected_instructions"]


def write_source(path: Path, prefix: str, n: int) -> Path:
    records = [{"instruction": f"{prefix} question number {i}: explain topic {i} of {prefix} in one sentence?", "input": "",
                "output": f"A careful {prefix} answer to question {i}, with a detail about topic {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def curation_config(source: Path) -> dict:
    return {"ops": {
        "raw_instructions": {"config": {"sources": [{"path": str(source), "name": source.stem}]}},
        "mmlu_benchmark": {"config": {"subjects": ["astronomy"], "questions_per_subject": 2}},
    }}


def run_subset(defs, keys, run_config, instance):
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in keys})
    return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)


def test_overlapping_runs_each_read_their_own_upstream_outputs(tmp_path, monkeypatch):
    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    defs = build_definitions(storage, MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    source_a = write_source(tmp_path / "run_a.jsonl", "alpha", 40)
    source_b = write_source(tmp_path / "run_b.jsonl", "beta", 26)
    runs = {}
    original_load = HandoffIOManager.load_input

    def load_after_run_b(self, context):
        # The first time run A's clean step loads raw_instructions, run B runs from start to end.
        if context.asset_key == dg.AssetKey("raw_instructions") and "b" not in runs:
            runs["b"] = None  # run B's own loads go straight through
            runs["b"] = run_subset(defs, CURATION, curation_config(source_b), instance)
        return original_load(self, context)

    monkeypatch.setattr(HandoffIOManager, "load_input", load_after_run_b)
    with dg.instance_for_test() as instance:
        runs["a"] = run_subset(defs, CURATION, curation_config(source_a), instance)

    for name, source, n in (("a", source_a, 40), ("b", source_b, 26)):
        result = runs[name]
        assert result.success, name
        raw = result.output_for_node("raw_instructions")
        clean = result.output_for_node("curated_instructions", "clean_instructions")
        rejected = result.output_for_node("curated_instructions", "rejected_instructions")
        # Each run's clean step read exactly its own raw records: none vanished, none came from the other run.
        assert raw.records_read == n and clean.records_in == n, name
        assert clean.rows + rejected.rows == n, name
        rows = pd.read_parquet(clean.file(ROWS_FILE))
        assert set(rows["source"]) == {source.stem}, name
        # Lineage: the run's log records which hand-off each step loaded, with its digest and producing run.
        loaded = [e for e in result.all_events if e.event_type_value == "LOADED_INPUT" and e.step_key == "curated_instructions"
                  and e.event_specific_data.input_name == "raw_instructions"]
        assert len(loaded) == 1, name
        metadata = loaded[0].event_specific_data.metadata
        assert metadata["digest"].value == raw.digest and metadata["materialized_by_run"].value == result.run_id, name
    assert runs["a"].output_for_node("raw_instructions").path != runs["b"].output_for_node("raw_instructions").path


CHILD = textwrap.dedent('''
    """Materialize an asset selection on DAGSTER_HOME and block forever in the middle of writing a Parquet file
    whose path contains a fragment: the parent kills this process there."""
    import json, os, sys, time
    import dagster as dg
    import pyarrow.parquet as pq

    marker, fragment, root, tracking, keys, run_config = sys.argv[1:7]
    original = pq.ParquetWriter.write_table

    def write_then_block(self, table, *args, **kwargs):
        original(self, table, *args, **kwargs)
        where = str(getattr(self.where, "name", self.where))  # pandas hands pyarrow an open file
        if fragment in where:
            # The file is half written (no footer yet): tell the parent where we are, then wait to be killed.
            open(marker, "w").write(where)
            time.sleep(600)

    pq.ParquetWriter.write_table = write_then_block
    import sft_pipeline.schema as schema

    write_rows = schema.write_rows

    def write_rows_then_block(frame, path):
        # Row tables go through pandas, which hands pyarrow an open file: intercept them by path here.
        if fragment in str(path):
            write_rows(frame, path)
            with open(path, "r+b") as handle:  # keep the first half: a file whose writer died mid-way
                handle.truncate(max(1, handle.seek(0, 2) // 2))
            open(marker, "w").write(str(path))
            time.sleep(600)
        return write_rows(frame, path)

    schema.write_rows = write_rows_then_block
    from sft_pipeline.definitions import build_definitions
    from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage

    defs = build_definitions(PipelineStorage(root=root), MlflowTracking(tracking_uri=tracking))
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in keys.split(",")})
    with dg.DagsterInstance.get() as instance:
        job.execute_in_process(run_config=json.loads(run_config), instance=instance)
''')


def kill_while_writing(tmp_path, fragment, keys, run_config, root, tracking) -> Path:
    """Run the child until it is inside the write of a file matching `fragment`, SIGKILL it by pid,
    and return the half-written file's path."""
    marker = tmp_path / f"writing-{fragment.replace('/', '_')}"
    marker.unlink(missing_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(marker), fragment, root, tracking, ",".join(keys), json.dumps(run_config)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Bounded by the child's own progress, not by a wall-clock budget: it either reaches the write or exits.
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(f"the child exited ({child.returncode}) before writing {fragment}:\n{child.stderr.read()[-3000:]}")
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return Path(marker.read_text())


@pytest.fixture
def persistent(tmp_path, monkeypatch):
    """A persistent instance (DAGSTER_HOME) shared by this process and the child that gets killed."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    root = str(tmp_path / "artifacts")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    defs = build_definitions(PipelineStorage(root=root), MlflowTracking(tracking_uri=tracking))
    with dg.DagsterInstance.get() as instance:
        yield defs, instance, root, tracking


@pytest.mark.parametrize("fragment", ["clean_instructions/", "rejected_instructions/", "raw_instructions/"])
def test_kill_during_a_curation_write_leaves_the_recorded_output_in_force(tmp_path, persistent, fragment):
    defs, instance, root, tracking = persistent
    good = run_subset(defs, CURATION, curation_config(write_source(tmp_path / "good.jsonl", "good", 30)), instance)
    assert good.success
    recorded = {key: defs.load_asset_value(key, instance=instance) for key in ("raw_instructions", "clean_instructions", "rejected_instructions")}

    other = curation_config(write_source(tmp_path / "other.jsonl", "other", 50))
    half_written = kill_while_writing(tmp_path, fragment, CURATION, other, root, tracking)
    assert half_written.parent.name.startswith(STAGING_PREFIX)  # it was never in a folder anyone is handed

    # A later step is handed recorded, complete outputs only: the step that was killed recorded nothing
    # (clean and rejected are one step), so its assets keep their last outputs; every file is intact.
    killed_step = {"raw_instructions"} if fragment.startswith("raw") else {"clean_instructions", "rejected_instructions"}
    for key, before in recorded.items():
        after = defs.load_asset_value(key, instance=instance)
        after.verify()
        if key in killed_step or fragment.startswith("raw"):
            assert after == before, key
        else:  # raw_instructions finished before the kill: its new output was recorded, complete
            assert after.records_read == 50
    assert len(pd.read_parquet(recorded["clean_instructions"].file(ROWS_FILE))) == recorded["clean_instructions"].rows

    # The next write under that folder removes the dead process's staging folder.
    assert half_written.parent.exists()
    again = run_subset(defs, CURATION, other, instance)
    assert again.success
    assert not half_written.parent.exists()
    assert not list(Path(root).glob(f"*/{STAGING_PREFIX}*"))
    assert again.output_for_node("curated_instructions", "clean_instructions").records_in == 50


def test_a_damaged_output_is_refused_by_the_steps_of_later_runs(tmp_path):
    from sft_pipeline.outputs import OutputCorrupted

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    defs = build_definitions(storage, MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    with dg.instance_for_test() as instance:
        first = run_subset(defs, CURATION, curation_config(write_source(tmp_path / "good.jsonl", "good", 30)), instance)
        assert first.success
        clean = defs.load_asset_value("clean_instructions", instance=instance)
        rows_path = clean.file(ROWS_FILE)
        rows_path.write_bytes(rows_path.read_bytes()[:1500])  # truncate -s 1500
        with pytest.raises(OutputCorrupted, match="rematerialize"):
            defs.load_asset_value("clean_instructions", instance=instance)
        # A later run's step that reads it fails instead of computing on the damaged file.
        job = defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_check_selection={dg.AssetCheckKey(dg.AssetKey("clean_instructions"), "clean_instructions_match_expectations")},
            asset_selection=set())
        again = job.execute_in_process(instance=instance, raise_on_error=False)
        assert not again.success
        failure = next(e for e in again.all_events if e.event_type_value == "STEP_FAILURE")
        assert "OutputCorrupted" in failure.step_failure_data.error.to_string()
