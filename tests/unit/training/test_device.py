"""Device checks: GPU-only settings fail on a CPU with the field named."""

from __future__ import annotations

import pytest

from sft_pipeline.training import TrainingConfig, resolve_batching, train
from sft_pipeline.training.device import CPU_MAX_BATCH_TOKENS, cpu_has_native_bf16, resolve_max_batch_tokens
from tests.unit.training.helpers import make_cfg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("override, field_name", [
    ({"method": "qlora"}, "method"),
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    # accelerate turns FSDP on only for GPU ranks; on gloo CPU ranks it would silently be plain DDP
    ({"fsdp": True}, "fsdp"),
    ({"deepspeed": "zero3.json"}, "deepspeed"),
    ({"use_gpu": True}, "use_gpu"),
])
def test_gpu_only_settings_fail_clearly_on_cpu(override, field_name, tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises((RuntimeError, ValueError), match=field_name) as info:
        train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, **override))
    assert "GPU" in str(info.value)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_cpus_native_bf16(native, monkeypatch):
    from sft_pipeline.training import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    cfg = lambda **kw: TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", use_gpu=False, **kw)  # noqa: E731
    assert device.resolve_bf16(cfg()) is native
    assert device.resolve_bf16(cfg(bf16=False)) is False
    if native:
        assert device.resolve_bf16(cfg(bf16=True)) is True
    else:
        with pytest.raises(ValueError, match="TrainingConfig.bf16: true, but this CPU has neither AVX512-BF16 nor AMX"):
            device.resolve_bf16(cfg(bf16=True))


def test_cpu_native_bf16_is_what_torch_reports(monkeypatch):
    import torch

    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_has_native_bf16() is (avx512_bf16 or amx)


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


@pytest.mark.skipif(__import__("torch").cuda.is_available() or not cpu_has_native_bf16(),
                    reason="needs a CPU that multiplies bf16 natively (AVX512-BF16 or AMX)")
def test_bf16_lora_trains_on_a_cpu_with_native_bf16(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The default on such CPUs: a bf16 frozen base, fp32 adapter weights, bf16 autocast; the loss falls."""
    from safetensors.torch import load_file

    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, bf16=None, max_steps=8, learning_rate=1e-2,
                       eval_steps=8))
    assert r.precision == "bf16" and r.device == "cpu"
    losses = [h["loss"] for h in r.history if h.get("loss") is not None]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    weights = load_file(f"{r.adapter_dir}/adapter_model.safetensors")
    assert weights and all(str(w.dtype) == "torch.float32" for w in weights.values())
