"""Evaluation of a base or fine-tuned model: MMLU questions and prompts, multiple-choice scoring, held-out
loss and task metrics, statistics, the promotion gate, reuse of base scores, and MLflow logging.

Imports only the ML stack (torch, transformers, peft lazily, pandas), so it runs on a GPU box.

Modules: `mmlu` (questions, subsets, k-shot examples), `prompts` (harness prompts, plain and chat),
`scoring` (one-pass multiple-choice scoring, accuracy summaries), `statistics` (Wilson, McNemar,
base-vs-tuned comparison), `answer_metrics` (exact match, F1, ROUGE-L, task kinds), `heldout` (held-out
loss, generations), `gate` (the promotion rule), `cache` (fingerprint, reuse key, base-evaluation
folder), `mlflow_log` (one MLflow run per evaluation). Model loading and greedy generation live in
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
from sft_pipeline.evaluation.gate import gate_verdict
from sft_pipeline.evaluation.heldout import (
    evaluate_generations,
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
from sft_pipeline.evaluation.statistics import compare_evaluations, mcnemar_exact, wilson_interval
from sft_pipeline.evaluation.answer_metrics import (
    TASK_KINDS,
    answer_label,
    compare_task_metrics,
    exact_match,
    normalize_answer,
    rouge_l,
    score_generations,
    task_deltas,
    task_kind,
    task_metrics,
    token_f1,
)
from sft_pipeline.modeling import generate_responses, left_padded_batches, load_model_for_eval


__all__ = [
    "DEFAULT_SUBJECTS",
    "LETTERS",
    "MAX_FEWSHOT",
    "PREDICTION_COLUMNS",
    "PROMPT_FORMATS",
    "SCORING_VERSION",
    "TASK_KINDS",
    "answer_label",
    "base_evaluation_key",
    "benchmark_fingerprint",
    "build_mmlu_contexts",
    "compare_evaluations",
    "compare_task_metrics",
    "evaluate_generations",
    "exact_match",
    "flatten_metrics",
    "format_mmlu_prompt",
    "format_mmlu_question",
    "gate_verdict",
    "generate_responses",
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
    "read_row_categories",
    "rouge_l",
    "save_base_evaluation",
    "score_generations",
    "score_multiple_choice",
    "select_fewshot_examples",
    "side_by_side_generations",
    "summarize_accuracy",
    "task_deltas",
    "task_kind",
    "task_metrics",
    "token_f1",
    "wilson_interval",
]
