"""What this machine can run: device checks, bf16, the batching mode and the attention kernel."""

from __future__ import annotations

from sft_pipeline.training.config import TrainingConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_bf16(cfg: TrainingConfig) -> bool:
    """bf16 mixed precision or not: `cfg.bf16`, or where it is None, whether the device multiplies bf16 natively."""
    import torch

    on_cpu = uses_cpu(cfg)
    capable = cpu_has_native_bf16() if on_cpu else torch.cuda.is_bf16_supported()
    if cfg.bf16 is None:
        return capable
    if cfg.bf16 and not capable:
        where = "this CPU has neither AVX512-BF16 nor AMX" if on_cpu else "this GPU does not support bf16"
        raise ValueError(f"TrainingConfig.bf16: true, but {where}; use false, or null for auto")
    return cfg.bf16


def uses_cpu(cfg: TrainingConfig) -> bool:
    """Train on the CPU: no CUDA GPU visible to this process, or `use_gpu: false`."""
    import torch

    return cfg.use_gpu is False or not torch.cuda.is_available()


def check_device_support(cfg: TrainingConfig) -> None:
    """Fail early, naming the field, for settings this machine cannot run (QLoRA, Liger, several GPUs on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.method == "qlora":
        if not cuda:
            raise RuntimeError(
                "TrainingConfig.method: 'qlora' loads the base model in 4-bit NF4 through bitsandbytes, which needs "
                "a CUDA GPU, and none is visible here (torch.cuda.is_available() is False). Use method='lora' "
                "(same adapter, unquantized base) on this machine.")
        if not torch.cuda.is_bf16_supported():
            raise RuntimeError("TrainingConfig.method: 'qlora' computes in bf16 and needs a bf16-capable GPU "
                               "(Ampere or newer); use method='lora' here.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("TrainingConfig.method: 'qlora' needs the bitsandbytes package") from exc
    if cfg.use_liger_kernel:
        if not cuda:
            raise RuntimeError("TrainingConfig.use_liger_kernel: Liger kernels are Triton GPU kernels; this machine "
                               "has no CUDA GPU. Set use_liger_kernel=false.")
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("TrainingConfig.use_liger_kernel: pip install liger-kernel first") from exc
    if cfg.use_gpu and not cuda:
        raise RuntimeError("TrainingConfig.use_gpu: true, but this process sees no CUDA GPU "
                           "(torch.cuda.is_available() is False)")
    if (cfg.fsdp or cfg.deepspeed) and uses_cpu(cfg):
        name = "fsdp" if cfg.fsdp else "deepspeed"
        raise RuntimeError(
            f"TrainingConfig.{name}: {'FSDP' if cfg.fsdp else 'DeepSpeed'} needs CUDA GPUs and this process trains on "
            "the CPU. (accelerate enables FSDP only for GPU-type ranks: on gloo CPU ranks the trainer would silently "
            "run plain data parallelism instead.) Leave it off on a CPU; see docs/scaling.md for the GPU recipes.")
    if cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("TrainingConfig.deepspeed: pip install deepspeed first") from exc
    if cfg.launcher == "accelerate" and cfg.num_processes > 1 and not cfg.accelerate_config_file and (
        not cuda or torch.cuda.device_count() < cfg.num_processes
    ):
        have = torch.cuda.device_count() if cuda else 0
        raise RuntimeError(f"TrainingConfig.num_processes: accelerate launch starts {cfg.num_processes} processes on "
                           f"as many CUDA GPUs and this machine has {have} (accelerate launch --cpu starts only "
                           "one process); use launcher 'torchrun' for several CPU processes.")
    if cfg.attn_implementation and cfg.attn_implementation.startswith("flash_attention") and not cuda:
        raise RuntimeError(f"TrainingConfig.attn_implementation: {cfg.attn_implementation!r} needs a CUDA GPU; "
                           "use 'sdpa' (or null) on CPU.")


def _flash_attn_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _flex_attention_available() -> bool:
    """PyTorch's flex attention on a CUDA GPU (compiled with Triton; its backward does not run on a CPU)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _varlen_attention(attn: str | None) -> bool:
    """Whether padding-free batches get a variable-length kernel: FlashAttention's, or flex attention's block mask."""
    if attn:
        return attn.startswith("flash_attention") or attn == "flex_attention"
    return _flash_attn_available() or _flex_attention_available()


def resolve_batching(cfg: TrainingConfig) -> str:
    """'auto' -> padding_free where a variable-length kernel runs (FlashAttention, else flex attention on CUDA),
    else length_grouped.

    Without such a kernel (a CPU), SDPA takes a padding-free batch through a dense block-diagonal
    mask over the whole concatenated micro-batch: correct, but attention then costs (sum of
    lengths)^2 instead of sum(length^2), which bench/training.py shows is slower on CPU.
    Length-grouped padded batches cut most pad tokens without that mask. On one H200
    (bench/results/gpu_check_h200.json) padding-free batches on flex attention ran 1.36x the tokens/s of
    TRL's padded batches at 0.38x the peak memory (LoRA, SmolLM2-360M shape), 1.80x at 0.73x for full
    fine-tuning of a 1B shape.
    """
    if cfg.batching != "auto":
        return cfg.batching
    return "padding_free" if _varlen_attention(cfg.attn_implementation) else "length_grouped"


# Padded tokens per forward/backward pass on a CPU (see batching.py): SmolLM2-135M with LoRA keeps about
# 1.4 MiB of activations per token for the backward pass, so a pass holds about 1.1 GiB. At 1024 the
# demo's training peaked at 2.9 GiB, too close to its 3 GiB goal once MLflow (~0.1 GiB) is loaded too.
CPU_MAX_BATCH_TOKENS = 768


def resolve_max_batch_tokens(cfg: TrainingConfig) -> int:
    """The token budget of one pass over a padded micro-batch: the configured one, else 768 on CPU, none (0) on a GPU."""
    if cfg.max_batch_tokens is not None:
        return cfg.max_batch_tokens
    if resolve_batching(cfg) not in ("padded", "length_grouped"):
        return 0
    import torch

    return 0 if torch.cuda.is_available() else CPU_MAX_BATCH_TOKENS


def resolve_attn_implementation(cfg: TrainingConfig) -> str:
    """The attention kernel: the configured one, else for padding-free and packed batches on CUDA
    FlashAttention-2 when installed, else flex attention; else PyTorch SDPA (which takes padding-free batches
    through a dense block-diagonal mask)."""
    if cfg.attn_implementation:
        return cfg.attn_implementation
    batching = resolve_batching(cfg)
    if batching != "padded" and _flash_attn_available():
        return "flash_attention_2"
    if batching in ("padding_free", "packed") and _flex_attention_available():
        return "flex_attention"
    return "sdpa"
