"""Device checks: GPU-only settings fail on a CPU with the field named."""

from __future__ import annotations

import pytest

from sft_pipeline.training import TrainingConfig, resolve_batching, train
from sft_pipeline.training.device import CPU_MAX_BATCH_TOKENS, resolve_max_batch_tokens
from tests.unit.training.helpers import make_cfg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("override, field_name", [
    ({"method": "qlora"}, "method"),
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    ({"bf16": True}, "bf16"),
    # accelerate turns FSDP on only for GPU ranks; on gloo CPU ranks it would silently be plain DDP
    ({"fsdp": True}, "fsdp"),
    ({"deepspeed": "zero3.json"}, "deepspeed"),
    ({"use_gpu": True}, "use_gpu"),
])
def test_gpu_only_settings_fail_clearly_on_cpu(override, field_name, tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises((RuntimeError, ValueError), match=field_name) as info:
        train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, **override))
    assert "GPU" in str(info.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_default_is_length_grouped_with_a_token_budget():
    cfg = lambda **kw: TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", **kw)  # noqa: E731
    assert resolve_batching(cfg()) == "length_grouped"
    assert resolve_max_batch_tokens(cfg()) == CPU_MAX_BATCH_TOKENS
    assert resolve_max_batch_tokens(cfg(batching="padded")) == CPU_MAX_BATCH_TOKENS
    assert resolve_max_batch_tokens(cfg(batching="padding_free")) == 0  # one row per micro-batch: nothing to split
    assert resolve_max_batch_tokens(cfg(max_batch_tokens=0)) == 0
    assert resolve_max_batch_tokens(cfg(max_batch_tokens=4096)) == 4096


def test_gpu_default_is_padding_free_on_a_varlen_kernel(monkeypatch):
    """On CUDA: FlashAttention when installed, else flex attention (measured fastest on an H200), padding-free."""
    from sft_pipeline.training import device
    from sft_pipeline.training.device import resolve_attn_implementation

    cfg = lambda **kw: TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", **kw)  # noqa: E731
    monkeypatch.setattr(device, "_flash_attn_available", lambda: False)
    monkeypatch.setattr(device, "_flex_attention_available", lambda: True)
    assert (resolve_batching(cfg()), resolve_attn_implementation(cfg())) == ("padding_free", "flex_attention")
    assert resolve_attn_implementation(cfg(batching="packed")) == "flex_attention"
    assert resolve_attn_implementation(cfg(batching="padded")) == "sdpa"
    assert resolve_attn_implementation(cfg(batching="length_grouped")) == "sdpa"
    assert resolve_batching(cfg(attn_implementation="sdpa")) == "length_grouped"  # no varlen kernel asked for
    monkeypatch.setattr(device, "_flash_attn_available", lambda: True)
    assert (resolve_batching(cfg()), resolve_attn_implementation(cfg())) == ("padding_free", "flash_attention_2")
    monkeypatch.setattr(device, "_flash_attn_available", lambda: False)
    monkeypatch.setattr(device, "_flex_attention_available", lambda: False)
    assert (resolve_batching(cfg()), resolve_attn_implementation(cfg())) == ("length_grouped", "sdpa")
