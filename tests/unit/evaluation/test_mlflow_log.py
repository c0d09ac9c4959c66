"""One MLflow run per evaluation: params, metrics, tables, documents and the dataset input."""

import pandas as pd

from sft_pipeline.evaluation.mlflow_log import log_evaluation_run


def test_log_evaluation_run_records_scores_settings_and_tables(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    preds = pd.DataFrame({"question_id": ["a", "b"], "predicted": ["A", "C"], "correct": [True, False]})
    run_id = log_evaluation_run(uri, "evals", "eval-test", params={"num_fewshot": 5, "prompt_format": "chat", "subset_hash": "abc"},
                                metrics={"mmlu_accuracy": 0.5, "skipped": None, "mmlu_subject/astronomy": 1.0},
                                tables={"mmlu_predictions.json": preds}, documents={"summary.json": {"x": 1}},
                                tags={"dagster_asset": "model_evaluation"}, dataset=preds, dataset_digest="abc")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"num_fewshot": "5", "prompt_format": "chat", "subset_hash": "abc"}
    assert run.data.metrics == {"mmlu_accuracy": 0.5, "mmlu_subject/astronomy": 1.0}
    assert run.data.tags["dagster_asset"] == "model_evaluation"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"mmlu_predictions.json", "summary.json"}
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["abc"]


def test_flatten_metrics():
    from sft_pipeline.evaluation.mlflow_log import flatten_metrics

    summary = {"accuracy": 0.5, "accuracy_ci": [0.2, 0.8], "macro_accuracy": None,
               "per_subject": {"astronomy": {"accuracy": 1.0}}, "per_category": {"STEM": {"accuracy": 0.25}}}
    assert flatten_metrics("mmlu_", summary) == {
        "mmlu_accuracy": 0.5, "mmlu_accuracy_ci_low": 0.2, "mmlu_accuracy_ci_high": 0.8,
        "mmlu_subject/astronomy": 1.0, "mmlu_category/STEM": 0.25,
    }
