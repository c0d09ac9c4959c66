"""Tests for sft_pipeline.tokenization.config: a bad TokenizationConfig names the field."""

from __future__ import annotations

import pytest

from sft_pipeline.tokenization.config import TokenizationConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": "1024"}, "max_length"),
        ({"truncation": "clip"}, "truncation"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "validation_fraction"),
        ({"template": "nonsense"}, "template"),
        ({"template": "/no/such/template.jinja"}, "template"),
        ({"system_prompt": 3}, "system_prompt"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenizationConfig(**kwargs)
