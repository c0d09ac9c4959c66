"""MFU estimate."""

from __future__ import annotations

import pytest


def test_mfu_estimate():
    from sft_pipeline.training import model_flops_utilization

    # full fine-tuning: 6N FLOPs per token
    assert model_flops_utilization(1000.0, 10**9, 10**9, False, peak_tflops=600.0) == pytest.approx(0.01)
    # LoRA (few trainable): ~4N; recomputed activations add 2N
    assert model_flops_utilization(1000.0, 10**9, 0, False, peak_tflops=400.0) == pytest.approx(0.01)
    assert model_flops_utilization(1000.0, 10**9, 0, True, peak_tflops=600.0) == pytest.approx(0.01)
    assert model_flops_utilization(1000.0, 10**9, 0, False, device_name="NVIDIA H100 80GB HBM3") == \
        pytest.approx(4e12 / 989e12, abs=1e-4)
    assert model_flops_utilization(1000.0, 10**9, 0, False, device_name="cpu") is None
