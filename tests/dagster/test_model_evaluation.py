"""The evaluation assets called directly on a tiny model with typed hand-offs: reuse of the base
evaluation, the model_evaluation hand-off that registered_model reads, and what goes to MLflow."""

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline.defs.mmlu_benchmark import MmluBenchmarkConfig, mmlu_benchmark
from sft_pipeline.defs.model_evaluation import EvaluationConfig, ModelEvaluationConfig, base_model_evaluation, model_evaluation
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.outputs import (
    GENERATIONS_FILE,
    PREDICTIONS_FILE,
    ROWS_FILE,
    CleanInstructionsInfo,
    SyntheticInstructionsInfo,
    write_row_tables,
)
from sft_pipeline.tokenization import SftDatasetInfo
from sft_pipeline.training import TrainingResult


@pytest.fixture
def storage(tmp_path):
    return PipelineStorage(root=str(tmp_path / "artifacts"))


@pytest.fixture
def tracking(tmp_path):
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="evals")


def _prepare_upstream(storage, tiny_model_dir, tmp_path):
    """Hand-offs of base_model, fine_tuned_model, sft_dataset, clean and synthetic instructions, as those assets return them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = BaseModelInfo(path=str(tiny_model_dir), source=str(tiny_model_dir), revision="tiny-rev-1", num_parameters=0, dtype="float32",
                         has_chat_template=True, chat_template_source="tokenizer", model_type="llama")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tuned = TrainingResult(output_dir=str(tmp_path), method="lora", adapter_dir=str(adapter), model_dir=None, base_model_dir=str(tiny_model_dir),
                           train_loss=1.0, mean_train_loss=1.0, eval_loss=None, history=[], global_step=1, trainable_parameters=1,
                           total_parameters=1, train_rows=1, validation_rows=0, tokens_seen=1, train_runtime_s=1.0, tokens_per_second=1.0)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = {
        "c1": ("Classify the sentiment: I love it.", "Positive."),
        "c2": ("Is this spam? WIN A PRIZE NOW", "Spam. It promises a prize."),
        "g1": ("Write a short poem about the sea.", "The sea is wide and grey and calm."),
        "t1": ("Triage this ticket as JSON: I was charged twice for my order.", '{"queue": "billing", "urgency": "medium"}'),
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
    dataset = SftDatasetInfo(path=str(folder), splits={"test": 4}, files={"test": str(folder / "test.parquet")}, num_tokens=0,
                             trainable_tokens=0, truncated=0, dropped=0, max_length=256, template_name="tokenizer")
    categories = pd.DataFrame({"id": ["c1", "c2", "g1", "t1"],
                               "category": ["classification", "classification", "creative_writing", "ticket_triage"]})
    clean_folder, clean_digest = write_row_tables(storage.asset_dir("clean_instructions"), {ROWS_FILE: categories})
    clean = CleanInstructionsInfo(path=str(clean_folder), digest=clean_digest, files=(ROWS_FILE,), rows=4)
    synthetic_folder, synthetic_digest = write_row_tables(storage.asset_dir("synthetic_instructions"), {ROWS_FILE: categories.head(0)})
    synthetic = SyntheticInstructionsInfo(path=str(synthetic_folder), digest=synthetic_digest, files=(ROWS_FILE,))
    return base, tuned, dataset, clean, synthetic


@pytest.mark.slow
def test_evaluation_assets_end_to_end(storage, tracking, tiny_model_dir, tmp_path):
    from mlflow import MlflowClient

    base, tuned, dataset, clean, synthetic = _prepare_upstream(storage, tiny_model_dir, tmp_path)
    bench = mmlu_benchmark(MmluBenchmarkConfig(subjects=["astronomy", "marketing"], questions_per_subject=3, num_fewshot=2), storage)
    assert bench.metadata["dagster/row_count"] == 6 and bench.metadata["num_fewshot"] == 2
    assert bench.data_version.value == bench.metadata["subset_hash"] == bench.value.fingerprint
    benchmark = bench.value

    def run_base(benchmark=benchmark):
        return base_model_evaluation(dg.build_asset_context(), EvaluationConfig(batch_size=4), storage, tracking, base, benchmark)

    first = run_base()
    assert first.metadata["reused"] is False and first.metadata["questions"] == 6
    assert "path" in first.metadata and first.data_version is not None
    base_run = first.metadata["mlflow_run_id"]
    preds_path = first.value.file(PREDICTIONS_FILE)
    mtime = pd.io.common.os.path.getmtime(preds_path)
    second = run_base()  # same base model, same benchmark: nothing is scored again
    assert second.metadata["reused"] is True
    assert second.data_version == first.data_version and second.metadata["mlflow_run_id"] == base_run
    assert pd.io.common.os.path.getmtime(preds_path) == mtime

    result = model_evaluation(dg.build_asset_context(), ModelEvaluationConfig(batch_size=4, max_new_tokens=6, min_task_improvement=-1.0),
                              storage, tracking, tuned, first.value, benchmark, dataset, base, clean, synthetic)
    manifest = result.value
    manifest.verify()
    assert result.metadata["reused"] is False
    # Unchanged weights, data, benchmark and settings: the evaluation is reused, nothing is scored or logged again.
    again = model_evaluation(dg.build_asset_context(), ModelEvaluationConfig(batch_size=4, max_new_tokens=6, min_task_improvement=-1.0),
                             storage, tracking, tuned, first.value, benchmark, dataset, base, clean, synthetic)
    assert again.metadata["reused"] is True and again.value == manifest and again.data_version == result.data_version
    assert again.metadata["evaluation_key"] == result.metadata["evaluation_key"]
    other = model_evaluation(dg.build_asset_context(), ModelEvaluationConfig(batch_size=4, max_new_tokens=5, min_task_improvement=-1.0),
                             storage, tracking, tuned, first.value, benchmark, dataset, base, clean, synthetic)
    assert other.metadata["reused"] is False and other.metadata["evaluation_key"] != result.metadata["evaluation_key"]
    # What registered_model reads: the verdict with its numbers.
    gate = manifest.gate
    assert set(gate) == {"passed", "reasons", "primary_metric", "alpha", "task", "mmlu", "test_loss"}
    assert gate["primary_metric"] == "exact_match" and gate["alpha"] == 0.05
    # Every held-out row is answered by default (generation_rows 0): 2 classification + 1 structured rows have exact match.
    assert gate["task"]["n"] == 3 and gate["task"]["test"] == "McNemar exact" and gate["task"]["effect_ci"] is not None
    assert 0.0 <= gate["task"]["p_value"] <= 1.0 and gate["mmlu"]["n"] == 6 and 0.0 <= gate["mmlu"]["p_value"] <= 1.0
    assert gate["passed"] is False  # 3 rows are too few evidence (min_generation_rows 10), whatever the tiny model says
    assert any(r.startswith("held-out rows with a paired exact_match: 3, 7 fewer") for r in gate["reasons"]), gate["reasons"]
    assert 0.0 <= manifest.tuned["accuracy"] <= 1.0 and manifest.tuned["test"]["loss"] > 0
    assert set(manifest.comparison) >= {"base_accuracy", "tuned_accuracy", "accuracy_delta", "paired"}
    assert manifest.comparison["paired"]["n"] == 6 and "p_value_tuned_worse" in manifest.comparison["paired"]
    assert manifest.mlflow_run_id == result.metadata["mlflow_run_id"]
    tuned_task = manifest.task["tuned"]
    assert (tuned_task["classification_rows"], tuned_task["generative_rows"], tuned_task["structured_rows"]) == (2, 1, 1)
    assert manifest.task["primary"]["n"] == 3 and set(manifest.task["paired"]) >= {"exact_match", "valid", "field_accuracy"}
    assert result.metadata["path"] and result.data_version.value == manifest.digest
    generations = pd.read_parquet(manifest.file(GENERATIONS_FILE))
    assert generations["kind"].tolist() == ["classification", "classification", "generative", "structured"]
    assert generations["category"].tolist() == ["classification", "classification", "creative_writing", "ticket_triage"]
    assert set(generations.columns) >= {"reference", "base_generation", "tuned_generation", "base_score", "tuned_score",
                                        "base_valid", "tuned_field_accuracy"}
    # The comparison as a picture and a table, and the gate in words and numbers.
    assert result.metadata["base_vs_tuned_chart"].value.startswith("![plot](data:image/png;base64,")
    table = result.metadata["base_vs_tuned"].value
    assert "| **exact match** (primary) | 3 |" in table and "| valid JSON | 1 |" in table and "| MMLU accuracy | 6 |" in table
    assert result.metadata["gate"].value.startswith("**Gate: failed** (alpha 0.05)")
    assert result.metadata["gate_n"] == 3 and result.metadata["gate_primary_metric"] == "exact_match"
    assert result.metadata["gate_p_value"] == pytest.approx(gate["task"]["p_value"])
    assert result.metadata["gate_test"] == "McNemar exact"
    predictions = pd.read_parquet(manifest.file(PREDICTIONS_FILE))
    assert len(predictions) == 6 and set(predictions.columns) >= {"subject", "question_id", "predicted", "answer", "logprob_A"}

    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    run = client.get_run(manifest.mlflow_run_id)
    assert run.data.params["num_fewshot"] == "2" and run.data.params["prompt_format"] == "plain"
    assert run.data.params["subset_hash"] == bench.metadata["subset_hash"]
    assert run.data.params["base_evaluation_run_id"] == base_run
    assert run.data.metrics["mmlu_accuracy"] == pytest.approx(manifest.tuned["accuracy"])
    assert "mmlu_paired_p_value" in run.data.metrics and "task_score_base" in run.data.metrics
    assert run.data.metrics["gate_p_value"] == pytest.approx(gate["task"]["p_value"]) and run.data.metrics["gate_n"] == 3
    assert "task_valid" in run.data.metrics and run.data.params["primary_metric"] == "exact_match"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"mmlu_predictions.json", "mmlu_predictions_base.json", "generations.json", "summary.json"} <= artifacts

    # Another benchmark (zero-shot) gets another key: the base model is scored again.
    zero_shot = mmlu_benchmark(MmluBenchmarkConfig(subjects=["astronomy", "marketing"], questions_per_subject=3), storage).value
    third = run_base(zero_shot)
    assert third.metadata["reused"] is False and third.metadata["evaluation_key"] != first.metadata["evaluation_key"]
