"""Jobs over the asset graph; the schedule and sensor that launch retraining live in `automation.py`."""

import dagster as dg

# The whole lifecycle, raw data to registered model: the full retrain job.
sft_pipeline_job = dg.define_asset_job(
    name="sft_pipeline_job",
    selection=dg.AssetSelection.all(),
    description="Full retrain: ingest, curate, augment, tokenize, train, evaluate, register. "
    "The nightly schedule and the raw-data sensor launch it with only the stale assets selected.",
)

# Ingestion through the tokenized dataset: no training, no evaluation.
data_job = dg.define_asset_job(
    name="data_job",
    selection=dg.AssetSelection.assets("sft_dataset", "rejected_instructions").upstream(),
    description="Data only: raw_instructions through sft_dataset (with base_model for the tokenizer and "
    "mmlu_benchmark for decontamination). Look at the data before spending GPU time.",
)

# Evaluation of the current fine-tuned model against the current base model; nothing is retrained.
eval_job = dg.define_asset_job(
    name="eval_job",
    selection=dg.AssetSelection.assets("mmlu_benchmark", "base_model_evaluation", "model_evaluation"),
    description="Evaluation only: re-score the current fine-tuned and base models on MMLU and the held-out split.",
)
