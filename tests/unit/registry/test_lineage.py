"""Lineage: version tags, dataset inputs and two-way links between training, evaluation and registration runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_pipeline.hashing import model_digest


def test_version_tags_and_two_way_lineage(registered, trained):
    from mlflow import MlflowClient

    uri, root, first, _, _, train_run, eval_run = registered
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version("tiny-sft", "1")
    assert mv.tags["dagster_run_id"] == "run-1" and mv.tags["base_model_revision"] == "tiny-rev"
    assert mv.tags["code_version.fine_tuned_model"] == "1"
    assert float(mv.tags["score.mmlu_accuracy"]) == pytest.approx(0.30)
    assert "score.nan_metric" not in mv.tags
    assert mv.tags["training_run_id"] == train_run and mv.tags["evaluation_run_id"] == eval_run
    assert mv.tags["sft_pipeline.model_sha256"] == model_digest(trained.adapter_dir)
    assert set(first.dataset_digests) == {"train", "validation", "test"}
    assert mv.tags["dataset_sha256.train"] == first.dataset_digests["train"]
    assert mv.run_id == first.run_id
    assert "## Data" in mv.description and "mmlu_accuracy" in mv.description

    reg_run = client.get_run(first.run_id)
    assert reg_run.data.tags["mlflow.parentRunId"] == train_run
    assert reg_run.data.params["method"] == "lora"
    assert "mmlu_accuracy" in reg_run.data.metrics and "nan_metric" not in reg_run.data.metrics
    assert reg_run.info.artifact_uri.startswith((Path(root) / "mlartifacts").as_uri())
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in reg_run.inputs.dataset_inputs}
    assert contexts == {"train": "train", "validation": "validation", "test": "test"}
    assert {i.dataset.digest for i in reg_run.inputs.dataset_inputs} == {d[:16] for d in first.dataset_digests.values()}

    training = client.get_run(train_run)
    assert training.data.tags["sft_pipeline.registered_version"] == "1"
    assert training.data.tags["sft_pipeline.registration_run_id"] == first.run_id
    assert {i.dataset.name for i in training.inputs.dataset_inputs} == {"train", "validation"}
    evaluation = client.get_run(eval_run)
    assert evaluation.data.tags["mlflow.parentRunId"] == train_run
    assert {i.dataset.name for i in evaluation.inputs.dataset_inputs} == {"test"}
