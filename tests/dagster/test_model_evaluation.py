"""The evaluation assets called directly on a tiny model: reuse of the base evaluation, the
model_evaluation manifest that registered_model reads, and what goes to MLflow."""

import json

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline.assets.evaluation import (
    EvaluationConfig,
    MmluBenchmarkConfig,
    ModelEvaluationConfig,
    base_model_evaluation,
    gate_verdict,
    mmlu_benchmark,
    model_evaluation,
)
from sft_pipeline.resources import MlflowTracking, PipelineStorage


@pytest.fixture
def storage(tmp_path):
    return PipelineStorage(root=str(tmp_path / "artifacts"))


@pytest.fixture
def tracking(tmp_path):
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="evals")


def _prepare_upstream(storage, tiny_model_dir, tmp_path):
    """Manifests of base_model, fine_tuned_model, sft_dataset and clean_instructions, as those assets write them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage.write_manifest("base_model", {"path": str(tiny_model_dir), "revision": "tiny-rev-1", "source": str(tiny_model_dir)})
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    storage.write_manifest("fine_tuned_model", {"adapter_dir": str(adapter), "mlflow_run_id": None})

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = {
        "c1": ("Classify the sentiment: I love it.", "Positive."),
        "c2": ("Is this spam? WIN A PRIZE NOW", "Spam. It promises a prize."),
        "g1": ("Write a short poem about the sea.", "The sea is wide and grey and calm."),
    }
    records = []
    for row_id, (user, answer) in convs.items():
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        p_ids, ids = tokenizer.encode(prompt), tokenizer.encode(full)
        records.append({"id": row_id, "input_ids": ids, "attention_mask": [1] * len(ids),
                        "labels": [-100] * len(p_ids) + ids[len(p_ids):], "length": len(ids), "messages": messages})
    folder = storage.asset_dir("sft_dataset") / "fp"
    folder.mkdir()
    pd.DataFrame(records).to_parquet(folder / "test.parquet")
    storage.write_manifest("sft_dataset", {"path": str(folder), "files": {"test": str(folder / "test.parquet")}, "template_name": "tokenizer"})
    pd.DataFrame({"id": ["c1", "c2", "g1"], "category": ["classification", "classification", "creative_writing"]}).to_parquet(
        storage.asset_dir("clean_instructions") / "rows.parquet")


@pytest.mark.slow
def test_evaluation_assets_end_to_end(storage, tracking, tiny_model_dir, tmp_path):
    from mlflow import MlflowClient

    _prepare_upstream(storage, tiny_model_dir, tmp_path)
    bench = mmlu_benchmark(MmluBenchmarkConfig(subjects=["astronomy", "marketing"], questions_per_subject=3, num_fewshot=2), storage)
    assert bench.metadata["dagster/row_count"] == 6 and bench.metadata["num_fewshot"] == 2
    assert bench.data_version.value == bench.metadata["subset_hash"]

    def run_base():
        return base_model_evaluation(dg.build_asset_context(), EvaluationConfig(batch_size=4), storage, tracking)

    first = run_base()
    assert first.metadata["reused"] is False and first.metadata["questions"] == 6
    assert "path" in first.metadata and first.data_version is not None
    base_run = first.metadata["mlflow_run_id"]
    preds_path = storage.read_manifest("base_model_evaluation")["predictions"]
    mtime = pd.io.common.os.path.getmtime(preds_path)
    second = run_base()  # same base model, same benchmark: nothing is scored again
    assert second.metadata["reused"] is True
    assert second.data_version == first.data_version and second.metadata["mlflow_run_id"] == base_run
    assert pd.io.common.os.path.getmtime(preds_path) == mtime

    result = model_evaluation(dg.build_asset_context(), ModelEvaluationConfig(batch_size=4, max_new_tokens=6, min_task_improvement=-1.0),
                              storage, tracking)
    manifest = storage.read_manifest("model_evaluation")
    # The keys registered_model reads.
    assert set(manifest["gate"]) == {"passed", "reasons"}
    assert 0.0 <= manifest["tuned"]["accuracy"] <= 1.0 and manifest["tuned"]["test"]["loss"] > 0
    assert set(manifest["comparison"]) >= {"base_accuracy", "tuned_accuracy", "accuracy_delta", "paired"}
    assert manifest["comparison"]["paired"]["n"] == 6
    assert manifest["mlflow_run_id"] == result.metadata["mlflow_run_id"]
    assert manifest["task"]["tuned"]["classification_rows"] == 2 and manifest["task"]["tuned"]["generative_rows"] == 1
    assert result.metadata["path"] and result.data_version.value == manifest["data_version"]
    generations = pd.read_parquet(f"{manifest['path']}/generations.parquet")
    assert generations["kind"].tolist() == ["classification", "classification", "generative"]
    assert set(generations.columns) >= {"reference", "base_generation", "tuned_generation", "base_score", "tuned_score"}
    predictions = pd.read_parquet(f"{manifest['path']}/predictions.parquet")
    assert len(predictions) == 6 and set(predictions.columns) >= {"subject", "question_id", "predicted", "answer", "logprob_A"}

    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.params["num_fewshot"] == "2" and run.data.params["prompt_format"] == "plain"
    assert run.data.params["subset_hash"] == bench.metadata["subset_hash"]
    assert run.data.params["base_evaluation_run_id"] == base_run
    assert run.data.metrics["mmlu_accuracy"] == pytest.approx(manifest["tuned"]["accuracy"])
    assert "mmlu_paired_p_value" in run.data.metrics and "task_score_base" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"mmlu_predictions.json", "mmlu_predictions_base.json", "generations.json", "summary.json"} <= artifacts

    # Another benchmark (zero-shot) gets another key: the base model is scored again.
    mmlu_benchmark(MmluBenchmarkConfig(subjects=["astronomy", "marketing"], questions_per_subject=3), storage)
    third = run_base()
    assert third.metadata["reused"] is False and third.metadata["evaluation_key"] != first.metadata["evaluation_key"]


def test_gate_verdict():
    comparison = {"accuracy_delta": -0.1, "paired": {"p_value": 0.02}}
    passed, reasons = gate_verdict(comparison, {"loss": 1.0}, {"loss": 0.9}, 0.05, 0.0, task_delta=0.1, min_task_improvement=0.0)
    assert not passed and len(reasons) == 1 and "p=0.02" in reasons[0]
    passed, reasons = gate_verdict({"accuracy_delta": 0.0}, {"loss": 1.0}, {"loss": 1.2}, 0.05, 0.0, task_delta=-0.2, min_task_improvement=0.0)
    assert not passed and len(reasons) == 2
    assert gate_verdict({"accuracy_delta": -0.01}, {"loss": 1.0}, {"loss": 1.0}, 0.05, 0.0, None, 0.0) == (True, [])
