"""Self-Instruct augmentation: a teacher LLM grows the human seed set with filtered synthetic rows.

Plain domain logic (no Dagster). Where things are:

* `config`: `SelfInstructConfig` (the run) and `TeacherConfig` (which model writes, how to reach it);
* `prompts`: what the teacher is asked; `parsing`: reading its replies;
* `novelty`: the ROUGE-L novelty filter and its candidate index; `filters`: the other candidate filters
  (blacklist, benchmark overlap, responses) and the filter order with its reason codes;
* `seeds`: the seed pool and example sampling; `journal`: the resumable per-key journal and its key;
* `generate`: the loop, `generate_synthetic_instructions`; `mixing`: `mix_human_and_synthetic`;
* `teachers`: the backends (local or hub Hugging Face model, OpenAI-compatible HTTP) and `build_teacher`.

ROUGE-L and n-gram helpers live in `sft_pipeline.text_metrics`, shared with curation and evaluation.
"""

from sft_pipeline.augmentation.config import BACKENDS, BUDGET_FIELDS, SelfInstructConfig, TeacherConfig
from sft_pipeline.augmentation.filters import (
    BENCHMARK_NGRAM,
    BLACKLIST,
    FILTERS,
    REASONS,
    REFUSAL_PREFIXES,
    BenchmarkOverlap,
    blacklisted_keyword,
    instruction_word_count,
    response_problem,
)
from sft_pipeline.augmentation.generate import SOURCE, STAGE, generate_synthetic_instructions
from sft_pipeline.augmentation.journal import JOURNAL_VERSION, GenerationJournal, generation_key, seed_data_version
from sft_pipeline.augmentation.mixing import mix_human_and_synthetic
from sft_pipeline.augmentation.novelty import NoveltyFilter
from sft_pipeline.augmentation.parsing import parse_input, parse_instruction, parse_instructions, parse_output_first
from sft_pipeline.augmentation.prompts import (
    PROMPT_VERSION,
    build_input_prompt,
    build_instruction_prompt,
    build_output_first_prompt,
    build_response_prompt,
    is_classification_task,
)
from sft_pipeline.augmentation.teachers import (
    LocalHFTeacher,
    OpenAICompatibleTeacher,
    Teacher,
    TeacherError,
    build_teacher,
    teacher_fingerprint,
    teacher_identity,
)
from sft_pipeline.text_metrics import rouge_l_f1
from sft_pipeline.text_metrics import rouge_tokens as tokenize

__all__ = [
    # the run
    "SelfInstructConfig", "generate_synthetic_instructions", "mix_human_and_synthetic",
    # teachers
    "TeacherConfig", "BACKENDS", "Teacher", "TeacherError", "LocalHFTeacher", "OpenAICompatibleTeacher",
    "build_teacher", "teacher_fingerprint", "teacher_identity",
    # prompts and parsing
    "PROMPT_VERSION", "build_instruction_prompt", "build_input_prompt", "build_output_first_prompt",
    "build_response_prompt", "is_classification_task", "parse_instruction", "parse_instructions", "parse_input",
    "parse_output_first",
    # filters
    "BLACKLIST", "REFUSAL_PREFIXES", "BENCHMARK_NGRAM", "FILTERS", "REASONS", "NoveltyFilter", "BenchmarkOverlap",
    "blacklisted_keyword", "instruction_word_count", "response_problem", "rouge_l_f1", "tokenize",
    # journal and provenance
    "SOURCE", "STAGE", "BUDGET_FIELDS", "JOURNAL_VERSION", "GenerationJournal", "seed_data_version", "generation_key",
]
