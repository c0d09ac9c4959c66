"""Fixtures of the training tests: tiny tokenized datasets written from the tiny tokenizer."""

from __future__ import annotations

import pytest

from tests.unit.training.helpers import write_tiny_sft_dataset


@pytest.fixture(scope="module")
def tiny_dataset_dir(tiny_model_dir, tmp_path_factory):
    return write_tiny_sft_dataset(tiny_model_dir, tmp_path_factory.mktemp("sft_dataset"))


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory):
    """16 training rows, no validation: the resume tests' dataset."""
    return write_tiny_sft_dataset(tiny_model_dir, tmp_path_factory.mktemp("resume_data"), n_train=16, n_val=0, n_test=0)
