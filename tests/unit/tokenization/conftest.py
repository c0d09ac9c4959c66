"""Fixtures of the tokenization unit tests: the tiny tokenizer, loaded once per module."""

import pytest


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
