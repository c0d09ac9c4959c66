"""Fixtures shared by the evaluation tests: the tiny model loaded for scoring, and a few real MMLU questions."""

import pytest

from sft_pipeline.evaluation.mmlu import load_mmlu
from sft_pipeline.modeling import load_model_for_eval


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model_for_eval(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def questions():
    # Real MMLU text of varied lengths, so batches need padding.
    return load_mmlu(subjects=["astronomy", "marketing", "abstract_algebra"], questions_per_subject=3)
