"""Device checks: GPU-only settings fail on a CPU with the field named."""

from __future__ import annotations

import pytest

from sft_pipeline.training import train
from tests.unit.training.helpers import make_cfg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("override, field_name", [
    ({"method": "qlora"}, "method"),
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    ({"bf16": True}, "bf16"),
])
def test_gpu_only_settings_fail_clearly_on_cpu(override, field_name, tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises((RuntimeError, ValueError), match=field_name) as info:
        train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, **override))
    assert "GPU" in str(info.value)
