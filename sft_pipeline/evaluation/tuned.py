"""Evaluating a tuned model against its base: MMLU with a paired comparison, held-out loss and task
metrics of both models, and the gate verdict. Plain inputs and outputs; the Dagster asset only maps them.
`GateSettings` lives with the rule in `gate` and is re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.evaluation.answer_metrics import TASK_METRIC_KEYS, compare_task_metrics
from sft_pipeline.evaluation.gate import GateSettings, evaluate_gate
from sft_pipeline.evaluation.heldout import (
    MAX_GENERATION_ROWS,
    evaluate_generations,
    generation_rows,
    heldout_loss,
    side_by_side_generations,
)
from sft_pipeline.evaluation.scoring import score_multiple_choice, summarize_accuracy
from sft_pipeline.evaluation.statistics import compare_evaluations
from sft_pipeline.modeling import load_model_for_eval


@dataclass
class TunedEvaluation:
    """Everything `evaluate_tuned_model` measured."""

    tuned: dict[str, Any]
    base: dict[str, Any]
    comparison: dict[str, Any]
    gate: dict[str, Any]
    task: dict[str, Any] | None
    predictions: pd.DataFrame
    generations: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_tuned_model(
    base_model_dir: str | Path,
    tuned_weights: dict[str, str | None],
    questions: pd.DataFrame,
    fewshot: pd.DataFrame | None,
    prompt_format: str,
    base_summary: dict[str, Any],
    base_predictions: pd.DataFrame | None,
    test_path: str | Path,
    categories: dict[str, str],
    gate: GateSettings,
    batch_size: int = 8,
    generation_batch_size: int = 32,
    generation_rows_limit: int = MAX_GENERATION_ROWS,
    max_new_tokens: int = 64,
    chat_template: str | None = None,
) -> TunedEvaluation:
    """Score the base model's held-out loss and generations, then the tuned model's MMLU, held-out loss
    and generations (`tuned_weights`: `adapter_dir` over the base, or a whole `model_dir`), and decide the gate.

    `batch_size`: sequences per forward pass for MMLU and the held-out loss; `generation_batch_size`: rows
    generated together. `generation_rows_limit`: how many held-out rows (first by id) both models answer (`heldout.generation_limit`
    maps the config's 0 = all); the task comparison tests `gate.primary_metric` paired over those rows.

    The base model's held-out figures are computed here, not with its MMLU scores, so that the base
    evaluation depends only on the base model and the benchmark and survives retrains.
    """
    rows = generation_rows(test_path, categories, generation_rows_limit)
    base_model, base_tokenizer = load_model_for_eval(base_model_dir)
    base_test = heldout_loss(base_model, test_path, batch_size=batch_size)
    base_gen = evaluate_generations(base_model, base_tokenizer, rows, max_new_tokens, generation_batch_size,
                                    chat_template) if len(rows) else None
    del base_model
    if tuned_weights.get("adapter_dir"):
        model, tokenizer = load_model_for_eval(base_model_dir, tuned_weights["adapter_dir"])
    else:
        model, tokenizer = load_model_for_eval(tuned_weights["model_dir"])
    predictions = score_multiple_choice(model, tokenizer, questions, batch_size=batch_size, fewshot=fewshot, prompt_format=prompt_format)
    tuned = summarize_accuracy(predictions)
    tuned["test"] = heldout_loss(model, test_path, batch_size=batch_size)
    tuned_gen = evaluate_generations(model, tokenizer, rows, max_new_tokens, generation_batch_size, chat_template) if len(rows) else None
    del model

    base = {**base_summary, "test": base_test}
    comparison = compare_evaluations(base, tuned, base_predictions, predictions)
    task = None
    if base_gen is not None:
        task = compare_task_metrics(base_gen, tuned_gen, primary_metric=gate.primary_metric)
        base["task"], tuned["task"] = task["base"], task["tuned"]
    # Without both prediction tables there is no paired count; the smaller summary bounds what both scored.
    paired_n = (comparison.get("paired") or {}).get("n")
    mmlu_questions = paired_n if paired_n is not None else min(int(base.get("num_questions") or 0), int(tuned.get("num_questions") or 0))
    verdict = evaluate_gate(comparison, base_test, tuned["test"], gate, task, mmlu_questions=mmlu_questions)
    return TunedEvaluation(
        tuned=tuned, base=base, comparison=comparison, gate=verdict, task=task,
        predictions=predictions, generations=side_by_side_generations(base_gen, tuned_gen) if base_gen is not None else None,
    )


def evaluation_metrics(result: TunedEvaluation) -> dict[str, float | None]:
    """MLflow metric names and values of a tuned evaluation (both models, deltas, the gate)."""
    from sft_pipeline.evaluation.mlflow_log import flatten_metrics

    tuned, base, comparison = result.tuned, result.base, result.comparison
    metrics = {**flatten_metrics("mmlu_", tuned), **flatten_metrics("mmlu_base_", base),
               "mmlu_accuracy_delta": comparison["accuracy_delta"], "mmlu_macro_accuracy_delta": comparison["macro_accuracy_delta"],
               "mmlu_paired_p_value": (comparison.get("paired") or {}).get("p_value"),
               "test_loss": tuned["test"]["loss"], "test_loss_base": base["test"]["loss"],
               "test_perplexity": tuned["test"]["perplexity"], "test_perplexity_base": base["test"]["perplexity"],
               "gate_passed": float(result.gate["passed"])}
    if result.task is not None:
        for side in ("base", "tuned"):
            for k in TASK_METRIC_KEYS:
                metrics[f"task_{k}" + ("_base" if side == "base" else "")] = result.task[side][k]
    metrics.update(gate_metrics(result.gate))
    return metrics


def gate_metrics(gate: dict[str, Any]) -> dict[str, float | None]:
    """The gate's numbers as MLflow metrics: `gate_p_value`, `gate_effect` (+ CI bounds), `gate_n` of the
    primary held-out metric, and the forgetting guard's one-sided `gate_mmlu_p_value`."""
    task, mmlu = gate.get("task") or {}, gate.get("mmlu") or {}
    ci = task.get("effect_ci") or [None, None]
    return {"gate_p_value": task.get("p_value"), "gate_effect": task.get("effect"), "gate_effect_ci_low": ci[0],
            "gate_effect_ci_high": ci[1], "gate_n": task.get("n"), "gate_mmlu_p_value": mmlu.get("p_value")}
