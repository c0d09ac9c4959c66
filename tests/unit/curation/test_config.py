"""CurationConfig validation."""

import pytest

from sft_pipeline.curation.config import CurationConfig


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="near_dedup_threshold"):
        CurationConfig(near_dedup_threshold=1.5)
    with pytest.raises(ValueError, match="max_conversation_chars"):
        CurationConfig(max_conversation_chars=0)
