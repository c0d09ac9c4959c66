"""Evaluation of a base or fine-tuned model: MMLU questions and prompts, multiple-choice scoring, held-out
loss and task metrics, statistics, the promotion gate, reuse of base scores, and MLflow logging.

Imports only the ML stack (torch, transformers, peft lazily, pandas), so it runs on a GPU box.

Modules: `mmlu` (questions, subsets, k-shot examples), `prompts` (harness prompts, plain and chat),
`scoring` (one-pass multiple-choice scoring, accuracy summaries), `statistics` (Wilson, McNemar, paired
tests with bootstrap intervals, base-vs-tuned comparison), `answer_metrics` (JSON validity and field
accuracy, exact match, F1, ROUGE-L, task kinds), `heldout` (held-out loss, generations), `gate` (the
promotion rule), `report` (the base-vs-tuned table and the gate in Markdown), `cache` (fingerprint, reuse
key, base-evaluation folder), `mlflow_log` (one MLflow run per evaluation). Model loading and greedy generation live in
`sft_pipeline.modeling`.
"""

from __future__ import annotations


from sft_pipeline.evaluation.cache import (
    SCORING_VERSION,
    base_evaluation_key,
    benchmark_fingerprint,
    load_cached_base_evaluation,
    save_base_evaluation,
)
from sft_pipeline.evaluation.gate import GateSettings, evaluate_gate, gate_verdict
from sft_pipeline.evaluation.heldout import (
    MAX_GENERATION_ROWS,
    answer_token_budget,
    evaluate_generations,
    generation_limit,
    generation_prompts,
    generation_rows,
    heldout_loss,
    read_row_categories,
    side_by_side_generations,
)
from sft_pipeline.evaluation.mlflow_log import flatten_metrics, log_evaluation_run
from sft_pipeline.evaluation.mmlu import DEFAULT_SUBJECTS, LETTERS, MAX_FEWSHOT, load_mmlu, select_fewshot_examples
from sft_pipeline.evaluation.prompts import (
    PROMPT_FORMATS,
    build_mmlu_contexts,
    format_mmlu_prompt,
    format_mmlu_question,
    mmlu_chat_messages,
    mmlu_description,
)
from sft_pipeline.evaluation.scoring import (
    PREDICTION_COLUMNS,
    letter_token_ids,
    score_multiple_choice,
    summarize_accuracy,
)
from sft_pipeline.evaluation.statistics import (
    bootstrap_mean_interval,
    compare_evaluations,
    mcnemar_exact,
    paired_difference_test,
    wilson_interval,
)
from sft_pipeline.evaluation.answer_metrics import (
    ROW_METRICS,
    TASK_KINDS,
    TASK_METRIC_KEYS,
    answer_label,
    category_kinds,
    compare_task_metrics,
    exact_match,
    normalize_answer,
    parse_json_object,
    rouge_l,
    row_kinds,
    score_generations,
    score_row,
    structured_scores,
    task_deltas,
    task_kind,
    task_metrics,
    token_f1,
)
from sft_pipeline.evaluation.report import comparison_markdown, comparison_rows, gate_markdown, gate_summary
from sft_pipeline.modeling import generate_responses, left_padded_batches, load_model_for_eval


__all__ = [
    "DEFAULT_SUBJECTS",
    "GateSettings",
    "LETTERS",
    "MAX_FEWSHOT",
    "MAX_GENERATION_ROWS",
    "PREDICTION_COLUMNS",
    "PROMPT_FORMATS",
    "ROW_METRICS",
    "SCORING_VERSION",
    "TASK_KINDS",
    "TASK_METRIC_KEYS",
    "answer_label",
    "answer_token_budget",
    "base_evaluation_key",
    "benchmark_fingerprint",
    "bootstrap_mean_interval",
    "build_mmlu_contexts",
    "category_kinds",
    "compare_evaluations",
    "compare_task_metrics",
    "comparison_markdown",
    "comparison_rows",
    "evaluate_gate",
    "evaluate_generations",
    "exact_match",
    "flatten_metrics",
    "format_mmlu_prompt",
    "format_mmlu_question",
    "gate_markdown",
    "gate_summary",
    "gate_verdict",
    "generate_responses",
    "generation_limit",
    "generation_prompts",
    "generation_rows",
    "heldout_loss",
    "left_padded_batches",
    "letter_token_ids",
    "load_cached_base_evaluation",
    "load_mmlu",
    "load_model_for_eval",
    "log_evaluation_run",
    "mcnemar_exact",
    "mmlu_chat_messages",
    "mmlu_description",
    "normalize_answer",
    "paired_difference_test",
    "parse_json_object",
    "read_row_categories",
    "rouge_l",
    "row_kinds",
    "save_base_evaluation",
    "score_generations",
    "score_multiple_choice",
    "score_row",
    "select_fewshot_examples",
    "side_by_side_generations",
    "structured_scores",
    "summarize_accuracy",
    "task_deltas",
    "task_kind",
    "task_metrics",
    "token_f1",
    "wilson_interval",
]
