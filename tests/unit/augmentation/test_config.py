"""SelfInstructConfig validation and help."""

from __future__ import annotations

import pytest

from sft_pipeline.augmentation.config import SelfInstructConfig


def test_config_validation_names_field():
    SelfInstructConfig(num_instructions=0, max_attempts=0)
    SelfInstructConfig(max_attempts=2, generate_inputs=False)
    for kwargs, name in [
        ({"num_instructions": -1}, "num_instructions"),
        ({"batch_size": 0}, "batch_size"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"rouge_threshold": 1.5}, "rouge_threshold"),
        ({"max_attempts": 2}, "max_attempts"),  # a round with inputs needs 3 calls
        ({"min_instruction_words": 10, "max_instruction_words": 5}, "max_instruction_words"),
        ({"seed_tasks_per_prompt": 0}, "seed_tasks_per_prompt"),
        ({"synthetic_tasks_per_prompt": 9}, "synthetic_tasks_per_prompt"),
        ({"new_tasks_per_prompt": 0}, "new_tasks_per_prompt"),
    ]:
        with pytest.raises(ValueError, match=name):
            SelfInstructConfig(**kwargs)
    assert "num_instructions" in SelfInstructConfig.help()
    assert SelfInstructConfig().seed_tasks_per_prompt == 8
