"""Measuring a run: peak memory and model FLOPs utilization (MFU)."""

from __future__ import annotations

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU; override with peak_tflops.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_memory_mib() -> float:
    """CUDA: max allocated bytes on this device; CPU: the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def model_flops_utilization(tokens_per_second: float, total: int, trainable: int, gradient_checkpointing: bool,
                            num_processes: int = 1, peak_tflops: float | None = None,
                            device_name: str | None = None) -> float | None:
    """MFU = achieved model FLOP/s / peak FLOP/s of the GPUs, or None without a known peak (e.g. on CPU).

    Model FLOPs per token: 2N forward + 2N backward through activations + 2 per trainable weight for
    its gradient (so 6N for full fine-tuning, about 4N for LoRA), +2N when activations are recomputed.
    Attention's sequence-length term is left out, as in the usual 6N estimate.
    """
    peak = peak_tflops * 1e12 if peak_tflops else None
    if peak is None and device_name:
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in device_name.lower()), None)
    if not peak or tokens_per_second <= 0:
        return None
    per_token = 4 * total + 2 * trainable + (2 * total if gradient_checkpointing else 0)
    return round(tokens_per_second * per_token / (peak * num_processes), 4)
