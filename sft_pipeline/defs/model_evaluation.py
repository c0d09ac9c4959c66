"""Evaluation: `base_model_evaluation` and `model_evaluation` (the gate verdict that registration obeys).

Thin layer: config, output folders, MLflow calls and metadata. Scoring, statistics and the gate live in
`sft_pipeline.evaluation`.
"""

from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.defs.metadata import markdown_table, png_markdown
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.defs.io_manager import decode, encode
from sft_pipeline.evaluation.cache import (
    SCORING_VERSION,
    base_evaluation_key,
    evaluation_key,
    load_cached_base_evaluation,
    load_cached_evaluation,
    save_base_evaluation,
    save_cached_evaluation,
)
from sft_pipeline.evaluation.answer_metrics import TASK_METRIC_KEYS
from sft_pipeline.evaluation.heldout import MAX_GENERATION_ROWS, generation_limit, read_row_categories
from sft_pipeline.evaluation.mlflow_log import flatten_metrics, log_evaluation_run
from sft_pipeline.evaluation.report import comparison_markdown, comparison_rows, gate_markdown
from sft_pipeline.evaluation.scoring import score_multiple_choice, summarize_accuracy
from sft_pipeline.evaluation.tuned import GateSettings, evaluate_tuned_model, evaluation_metrics
from sft_pipeline.model_resolution import BaseModelInfo
from sft_pipeline.modeling import load_model_for_eval
from sft_pipeline.outputs import (
    FEWSHOT_FILE,
    GENERATIONS_FILE,
    PREDICTIONS_FILE,
    QUESTIONS_FILE,
    ROWS_FILE,
    SUMMARY_FILE,
    BaseModelEvaluationInfo,
    CleanInstructionsInfo,
    MmluBenchmarkInfo,
    ModelEvaluationInfo,
    OutputCorrupted,
    SyntheticInstructionsInfo,
    content_digest,
    write_output_folder,
)
from sft_pipeline.tokenization import SftDatasetInfo
from sft_pipeline.tokenization.templates import TEMPLATES_DIR
from sft_pipeline.training import TrainingResult

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "6"
GROUP = "evaluation"


class EvaluationConfig(dg.Config):
    """How to score a model."""

    batch_size: int = pydantic.Field(default=8, description="Sequences per forward pass (questions, test rows).")
    generation_batch_size: int = pydantic.Field(
        default=32, ge=1,
        description="Held-out rows generated together. Greedy decoding on a CPU costs about the same per step for 8 or 32 "
        "rows, so larger batches finish sooner (the demo's 108 rows: 105 s at 8, 73 s at 32, identical answers).",
    )
    log_to_mlflow: bool = pydantic.Field(default=True, description="Log scores, settings and the prediction table to MLflow.")


class ModelEvaluationConfig(EvaluationConfig):
    """How to score the tuned model and gate its registration."""

    max_mmlu_drop: float = pydantic.Field(
        default=0.05, description="Gate: the tuned model may lose at most this much MMLU accuracy against the base model."
    )
    max_test_loss_increase: float = pydantic.Field(
        default=0.0, description="Gate: the tuned model's held-out test loss may exceed the base model's by at most this much."
    )
    min_task_improvement: float | None = pydantic.Field(
        default=0.0,
        description="Gate: the tuned model must improve the primary held-out metric significantly (mean paired "
        "difference > 0, paired test p < alpha) and by at least this much (0: any significant gain). A missing "
        "measurement fails the gate; null: the task metric does not gate (needed with generation_rows -1).",
    )
    primary_metric: str = pydantic.Field(
        default="exact_match",
        description="Gate: the held-out metric the task criterion tests, paired over the rows both models answered. "
        "exact_match: every JSON field equal (structured rows) or the label equal (classification rows); "
        "field_accuracy: share of JSON fields equal (0 when invalid); valid: the answer is a JSON object with the "
        "reference's keys; rouge_l, f1: free-text overlap; score: exact match on checkable rows, ROUGE-L on free text. "
        "0/1 metrics are tested with the exact McNemar test, others with a paired sign-flip permutation test.",
    )
    alpha: float = pydantic.Field(
        default=0.05, gt=0.0, lt=1.0,
        description="Gate: significance level of the task test (two-sided p < alpha with a positive effect) and of "
        "the MMLU forgetting guard (fails when the one-sided McNemar p that the tuned model is worse is < alpha).",
    )
    min_mmlu_questions: int = pydantic.Field(
        default=30, ge=0,
        description="Gate evidence: the MMLU accuracy delta counts only when both models scored at least this many "
        "questions; fewer, or a missing/NaN delta, fails the gate. The default benchmark has 40.",
    )
    min_test_rows: int = pydantic.Field(
        default=10, ge=0,
        description="Gate evidence: the held-out test loss counts only when computed on at least this many test rows with "
        "assistant tokens; fewer, an empty test split or a missing/NaN loss fails the gate.",
    )
    min_generation_rows: int = pydantic.Field(
        default=10, ge=0,
        description="Gate evidence: the primary held-out metric counts only when both models answered at least this many "
        "rows that have it; fewer fails the gate while min_task_improvement is set.",
    )
    generation_rows: int = pydantic.Field(
        default=0, ge=-1,
        description="Held-out test rows both models answer by greedy generation (task metrics): 0 = every row of the "
        "test split (at most max_generation_rows), n = the first n by id, -1 = no generation (then set "
        "min_task_improvement to null).",
    )
    max_generation_rows: int = pydantic.Field(
        default=MAX_GENERATION_ROWS, ge=1, description="Cap on the rows answered when generation_rows is 0 (first by id)."
    )
    max_new_tokens: int = pydantic.Field(
        default=64,
        description="Longest generated answer, in tokens, for free-text rows. Structured (JSON) and classification rows "
        "stop at their longest reference plus 16 tokens, at most this.",
    )
    sample_generations: int = pydantic.Field(default=5, description="Generations shown side by side in the metadata.")


def _benchmark_frames(benchmark: MmluBenchmarkInfo) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    fewshot = pd.read_parquet(benchmark.file(FEWSHOT_FILE))
    return pd.read_parquet(benchmark.file(QUESTIONS_FILE)), (fewshot if len(fewshot) else None)


def _score_params(benchmark: MmluBenchmarkInfo) -> dict:
    return {"num_fewshot": benchmark.num_fewshot, "prompt_format": benchmark.prompt_format,
            "subset_hash": benchmark.fingerprint, "mmlu_source": benchmark.source,
            "fewshot_source": ",".join(benchmark.shot_sources) or "none", "scoring_version": SCORING_VERSION}


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


def _groups_table(summary: dict, key: str, label: str) -> dg.MetadataValue:
    rows = [{label: name, "accuracy": round(v["accuracy"], 4), "n": v["n"],
             "95% CI": f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v.get("ci") else ""}
            for name, v in (summary.get(key) or {}).items()]
    return markdown_table(pd.DataFrame(rows), max_rows=60)


def _ci_text(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def _comparison_chart(rows: list[dict]) -> dg.MetadataValue:
    """Base vs tuned per metric (the rows of `comparison_rows`), each value with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("base") is not None and r.get("tuned") is not None]
    figure, axis = plt.subplots(figsize=(7, 0.7 * len(rows) + 1.6), layout="constrained")
    labels = [f"{r['label']} (primary)" if r.get("primary") else r["label"] for r in rows][::-1]
    for offset, side, color in ((-0.17, "base", "#9aa5b1"), (0.17, "tuned", "#4f6bed")):
        ys = [i + offset for i in range(len(rows))]
        values = [float(r[side]) for r in rows][::-1]
        cis = [r.get(f"{side}_ci") or [r[side], r[side]] for r in rows][::-1]
        errors = [[max(0.0, v - ci[0]) for v, ci in zip(values, cis)], [max(0.0, ci[1] - v) for v, ci in zip(values, cis)]]
        axis.barh(ys, values, height=0.34, color=color, label=side)
        axis.errorbar(values, ys, xerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=1)
        for y, v, ci in zip(ys, values, cis):
            axis.text(max(v, ci[1]) + 0.015, y, f"{v:.2f}", va="center", fontsize=8)
    axis.set_yticks(range(len(rows)), labels)
    axis.set_xlim(0, 1.12)
    axis.set_xlabel("score, with 95% confidence interval")
    axis.set_title("base vs tuned, held-out task and MMLU")
    figure.legend(loc="outside lower center", ncol=2, frameon=False)
    return png_markdown(figure)


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pytorch"}, pool="gpu")
def base_model_evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking,
    base_model: BaseModelInfo, mmlu_benchmark: MmluBenchmarkInfo,
) -> dg.MaterializeResult[BaseModelEvaluationInfo]:
    """Per-question MMLU predictions and scores of the base model, reused while the base model and the benchmark are unchanged."""
    key = base_evaluation_key(base_model.revision or base_model.path, mmlu_benchmark.fingerprint)
    folder = storage.asset_dir("base_model_evaluation") / key
    record = load_cached_base_evaluation(folder)
    reused = record is not None
    if reused:
        context.log.info("base model evaluation %s reused from %s", key, folder)
    else:
        questions, fewshot = _benchmark_frames(mmlu_benchmark)
        model, tokenizer = load_model_for_eval(base_model.path)
        predictions = score_multiple_choice(model, tokenizer, questions, batch_size=config.batch_size,
                                            fewshot=fewshot, prompt_format=mmlu_benchmark.prompt_format)
        del model
        summary = summarize_accuracy(predictions)
        run_id = None
        if config.log_to_mlflow:
            run_id = log_evaluation_run(
                mlflow_tracking.tracking_uri, mlflow_tracking.experiment, f"eval-base-{key[:8]}",
                params={**_score_params(mmlu_benchmark), "model": "base", "base_model_revision": base_model.revision,
                        "base_model_path": base_model.path, "evaluation_key": key},
                metrics=flatten_metrics("mmlu_", summary),
                tables={"mmlu_predictions.json": predictions},
                documents={"mmlu_summary.json": summary},
                tags={"dagster_run_id": context.run_id, "dagster_asset": "base_model_evaluation"},
                dataset=questions, dataset_digest=mmlu_benchmark.fingerprint,
            )
        record = {"key": key, "summary": summary, "mlflow_run_id": run_id, "settings": _score_params(mmlu_benchmark),
                  "base_model_revision": base_model.revision}
        save_base_evaluation(folder, predictions, record)
    files = (PREDICTIONS_FILE, SUMMARY_FILE)
    info = BaseModelEvaluationInfo(
        path=str(folder), digest=content_digest(folder, list(files)), files=files, key=key, fingerprint=mmlu_benchmark.fingerprint,
        summary=record["summary"], mlflow_run_id=record.get("mlflow_run_id"), reused=reused,
    )
    summary = info.summary
    return dg.MaterializeResult(
        value=info,
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "reused": reused,
            "evaluation_key": key,
            "subset_hash": mmlu_benchmark.fingerprint,
            "num_fewshot": mmlu_benchmark.num_fewshot,
            "prompt_format": mmlu_benchmark.prompt_format,
            "mmlu_accuracy": summary["accuracy"],
            "mmlu_accuracy_ci95": _ci_text(summary.get("accuracy_ci")),
            "mmlu_macro_accuracy": summary["macro_accuracy"],
            "questions": summary["num_questions"],
            "mlflow_run_id": info.mlflow_run_id or "",
            "per_subject": _groups_table(summary, "per_subject", "subject"),
            "per_category": _groups_table(summary, "per_category", "category"),
        },
        data_version=dg.DataVersion(info.digest),
    )


def _chat_template(sft_dataset: SftDatasetInfo) -> str | None:
    """The template sft_dataset trained with when it was a shipped one; None: the tokenizer's own."""
    name = sft_dataset.template_name or "tokenizer"
    path = Path(TEMPLATES_DIR) / f"{name}.jinja"
    return path.read_text(encoding="utf-8") if name != "tokenizer" and path.is_file() else None


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pytorch"}, pool="gpu")
def model_evaluation(
    context: dg.AssetExecutionContext, config: ModelEvaluationConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking,
    fine_tuned_model: TrainingResult, base_model_evaluation: BaseModelEvaluationInfo, mmlu_benchmark: MmluBenchmarkInfo,
    sft_dataset: SftDatasetInfo, base_model: BaseModelInfo,
    clean_instructions: CleanInstructionsInfo, synthetic_instructions: SyntheticInstructionsInfo,
) -> dg.MaterializeResult[ModelEvaluationInfo]:
    """Tuned-model MMLU with a paired test against the base model, held-out loss and task metrics of both, and the gate verdict."""
    if base_model_evaluation.fingerprint != mmlu_benchmark.fingerprint:
        raise ValueError("base_model_evaluation scored another benchmark subset; rematerialize it first")
    key = evaluation_key({
        "weights": fine_tuned_model.weights_hash, "base_evaluation": base_model_evaluation.digest,
        "benchmark": mmlu_benchmark.fingerprint, "dataset": sft_dataset.content_hash,
        "categories": [clean_instructions.digest, synthetic_instructions.digest], "config": config.model_dump(),
        "code_version": CODE_VERSION,
    })
    reuse_dir = storage.asset_dir("model_evaluation") / "reuse"
    info = _reused_evaluation(reuse_dir, key)
    reused = info is not None
    if reused:
        context.log.info("model evaluation %s reused from %s: same weights, data, benchmark and settings", key, info.path)
    else:
        info = _evaluate(context, config, storage, mlflow_tracking, fine_tuned_model, base_model_evaluation, mmlu_benchmark,
                         sft_dataset, base_model, clean_instructions, synthetic_instructions)
        save_cached_evaluation(reuse_dir, key, encode(info))
    return dg.MaterializeResult(value=info, metadata={**_metadata(info, config), "reused": reused, "evaluation_key": key},
                                data_version=dg.DataVersion(info.digest))


def _reused_evaluation(reuse_dir: Path, key: str) -> ModelEvaluationInfo | None:
    """The recorded evaluation under `key` when its files are intact; None otherwise."""
    record = load_cached_evaluation(reuse_dir, key)
    if record is None:
        return None
    info = decode(record)
    try:
        info.verify()
    except OutputCorrupted:
        return None
    return info


def _evaluate(context, config, storage, mlflow_tracking, fine_tuned_model, base_model_evaluation, mmlu_benchmark,
              sft_dataset, base_model, clean_instructions, synthetic_instructions) -> ModelEvaluationInfo:
    """Score both models, log the run to MLflow, and publish the evaluation folder."""
    questions, fewshot = _benchmark_frames(mmlu_benchmark)
    gate = GateSettings(max_mmlu_drop=config.max_mmlu_drop, max_test_loss_increase=config.max_test_loss_increase,
                        min_task_improvement=config.min_task_improvement, min_mmlu_questions=config.min_mmlu_questions,
                        min_test_rows=config.min_test_rows, min_generation_rows=config.min_generation_rows,
                        primary_metric=config.primary_metric, alpha=config.alpha)
    # The held-out split keeps only ids and messages; the curated and synthetic rows know each row's category.
    categories = read_row_categories([clean_instructions.file(ROWS_FILE), synthetic_instructions.file(ROWS_FILE)])
    result = evaluate_tuned_model(
        base_model.path, {"adapter_dir": fine_tuned_model.adapter_dir, "model_dir": fine_tuned_model.model_dir},
        questions, fewshot, mmlu_benchmark.prompt_format, base_model_evaluation.summary,
        pd.read_parquet(base_model_evaluation.file(PREDICTIONS_FILE)), sft_dataset.files["test"], categories, gate,
        batch_size=config.batch_size, generation_batch_size=config.generation_batch_size,
        generation_rows_limit=generation_limit(config.generation_rows, config.max_generation_rows),
        max_new_tokens=config.max_new_tokens,
        chat_template=_chat_template(sft_dataset),
    )
    tuned, base, comparison, task = result.tuned, result.base, result.comparison, result.task
    passed = result.gate["passed"]
    settings_params = _score_params(mmlu_benchmark)
    run_id = None
    if config.log_to_mlflow:
        tables = {"mmlu_predictions.json": result.predictions,
                  "mmlu_predictions_base.json": pd.read_parquet(base_model_evaluation.file(PREDICTIONS_FILE))}
        if result.generations is not None:
            tables["generations.json"] = result.generations
        run_id = log_evaluation_run(
            mlflow_tracking.tracking_uri, mlflow_tracking.experiment, f"eval-{context.run_id[:8]}",
            params={**settings_params, "model": "tuned", "adapter_dir": fine_tuned_model.adapter_dir,
                    "base_model_revision": base_model.revision, "generation_rows": config.generation_rows,
                    "max_generation_rows": config.max_generation_rows, "max_new_tokens": config.max_new_tokens,
                    "primary_metric": config.primary_metric, "alpha": config.alpha, "max_mmlu_drop": config.max_mmlu_drop,
                    "max_test_loss_increase": config.max_test_loss_increase,
                    "min_task_improvement": config.min_task_improvement,
                    "min_mmlu_questions": config.min_mmlu_questions, "min_test_rows": config.min_test_rows,
                    "min_generation_rows": config.min_generation_rows,
                    "base_evaluation_run_id": base_model_evaluation.mlflow_run_id or ""},
            metrics=evaluation_metrics(result),
            tables=tables,
            documents={"summary.json": {"tuned": tuned, "base": base, "comparison": comparison, "gate": result.gate, "task": task}},
            tags={"dagster_run_id": context.run_id, "dagster_asset": "model_evaluation", "gate_passed": str(passed),
                  "training_run_id": fine_tuned_model.mlflow_run_id or ""},
            dataset=questions, dataset_digest=mmlu_benchmark.fingerprint,
        )
    summary = {"tuned": tuned, "base": base, "comparison": comparison, "gate": result.gate, "task": task,
               "settings": settings_params, "mlflow_run_id": run_id, "fine_tuned_model": fine_tuned_model.weights_dir}

    def write(folder: Path) -> list[str]:
        import json

        result.predictions.to_parquet(folder / PREDICTIONS_FILE, index=False)
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        if result.generations is None:
            return [PREDICTIONS_FILE, SUMMARY_FILE]
        result.generations.to_parquet(folder / GENERATIONS_FILE, index=False)
        return [PREDICTIONS_FILE, SUMMARY_FILE, GENERATIONS_FILE]

    folder, digest = write_output_folder(storage.asset_dir("model_evaluation"), write)
    files = (PREDICTIONS_FILE, SUMMARY_FILE) + ((GENERATIONS_FILE,) if result.generations is not None else ())
    info = ModelEvaluationInfo(path=str(folder), digest=digest, files=files, tuned=tuned, base=base, comparison=comparison,
                               gate=result.gate, task=task, settings=settings_params, mlflow_run_id=run_id)
    return info


def _metadata(info: ModelEvaluationInfo, config) -> dict:
    """What the UI shows of an evaluation: scores with intervals, the gate with its numbers, the pictures."""
    tuned, base, comparison, task, settings_params = info.tuned, info.base, info.comparison, info.task, info.settings
    passed, reasons = info.gate.get("passed"), info.gate.get("reasons") or []
    folder, run_id = info.path, info.mlflow_run_id
    generations = pd.read_parquet(info.file(GENERATIONS_FILE)) if GENERATIONS_FILE in info.files else None
    per_subject = {s: {"base": base["per_subject"][s]["accuracy"], "tuned": v["accuracy"]} for s, v in tuned["per_subject"].items() if s in base["per_subject"]}
    paired = comparison.get("paired") or {"p_value": None, "delta_ci": None, "tuned_only_correct": 0, "base_only_correct": 0}
    rows = comparison_rows(comparison, task, config.primary_metric, base, tuned)
    gate_task, gate_mmlu = info.gate.get("task") or {}, info.gate.get("mmlu") or {}
    metadata = {
        "path": dg.MetadataValue.path(str(folder)),
        "mlflow_run_id": run_id or "",
        "subset_hash": settings_params["subset_hash"],
        "num_fewshot": settings_params["num_fewshot"],
        "prompt_format": settings_params["prompt_format"],
        "mmlu_accuracy": tuned["accuracy"],
        "mmlu_accuracy_ci95": _ci_text(tuned.get("accuracy_ci")),
        "mmlu_accuracy_base": base["accuracy"],
        "mmlu_accuracy_delta": comparison["accuracy_delta"],
        "mmlu_accuracy_delta_ci95": _ci_text(paired.get("delta_ci")),
        "mmlu_paired_p_value": paired["p_value"] if paired["p_value"] is not None else float("nan"),
        "mmlu_changed_answers": f"{paired['tuned_only_correct']} newly right, {paired['base_only_correct']} newly wrong",
        "test_loss": (tuned.get("test") or {}).get("loss"),
        "test_loss_base": (base.get("test") or {}).get("loss"),
        "test_perplexity": (tuned.get("test") or {}).get("perplexity"),
        "gate_passed": passed,
        "gate_reasons": "; ".join(reasons) or "all gates passed",
        "gate": dg.MetadataValue.md(gate_markdown(info.gate)),
        "gate_primary_metric": config.primary_metric,
        "gate_n": int(gate_task["n"]) if gate_task.get("n") is not None else 0,
        "gate_effect": _number(gate_task.get("effect")),
        "gate_effect_ci95": _ci_text(gate_task.get("effect_ci")),
        "gate_p_value": _number(gate_task.get("p_value")),
        "gate_test": gate_task.get("test") or "none",
        "gate_mmlu_p_value_tuned_worse": _number(gate_mmlu.get("p_value")),
        "base_vs_tuned": dg.MetadataValue.md(comparison_markdown(rows)),
        "base_vs_tuned_chart": _comparison_chart(rows) if rows else dg.MetadataValue.md("_(no measurements)_"),
        "per_subject_accuracy": _accuracy_chart(per_subject) if per_subject else dg.MetadataValue.md("_(no subjects)_"),
        "per_category": _groups_table(tuned, "per_category", "category"),
    }
    if task is not None:
        metadata["task_score"] = task["tuned"]["score"]
        metadata["task_score_base"] = task["base"]["score"]
        metadata["task_metrics"] = markdown_table(pd.DataFrame(
            [{"model": side, "rows": task[side]["rows"], **{k: task[side][k] for k in TASK_METRIC_KEYS}} for side in ("base", "tuned")]
        ).round(4))
        metadata["sample_generations"] = markdown_table(
            generations[["category", "kind", "reference", "base_generation", "tuned_generation", "base_score", "tuned_score"]].round(3),
            max_rows=max(0, config.sample_generations), max_chars=160)
    return metadata


def _number(value) -> float:
    """A metadata float: NaN stands for a missing measurement (Dagster shows it as such)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
