"""Measuring a run: peak memory (per step and for the whole process) and model FLOPs utilization (MFU)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU; override with peak_tflops.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mib(field: str) -> float | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in MiB (Linux), or None."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def current_rss_mib() -> float | None:
    """Resident set size of this process now (Linux), or None."""
    return _status_mib("VmRSS")


class MemoryTracker:
    """Peak memory of this process over an interval (one training step, one evaluation) and over its lifetime.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset at `begin` by writing 5 to
    /proc/self/clear_refs; the lifetime peak folds in every interval's peak, since the reset also
    clears `ru_maxrss`. CUDA: `torch.cuda.max_memory_allocated`, reset with `reset_peak_memory_stats`.
    Where the high-water mark cannot be reset (no /proc, a read-only one), interval peaks are None
    and the lifetime peak is `ru_maxrss`.
    """

    def __init__(self):
        self._folded = 0.0  # the largest peak seen before the last reset
        self._resettable: bool | None = None

    @staticmethod
    def _cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    def _device_peak(self) -> float | None:
        if self._cuda():
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _status_mib("VmHWM")
        if hwm is not None:
            return hwm
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def begin(self) -> None:
        """Start an interval: remember the peak so far, then reset the high-water mark."""
        self._folded = max(self._folded, self._device_peak() or 0.0)
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._resettable = True
            return
        if self._resettable is False:
            return
        try:
            _CLEAR_REFS.write_text("5")
            self._resettable = True
        except OSError:
            self._resettable = False

    def interval_peak_mib(self) -> float | None:
        """Peak since the last `begin` (None where the high-water mark cannot be reset)."""
        if not self._resettable:
            return None
        peak = self._device_peak()
        return round(peak, 1) if peak is not None else None

    def process_peak_mib(self) -> float:
        """Peak of the whole process so far (every interval included)."""
        return round(max(self._folded, self._device_peak() or 0.0), 1)


MEMORY = MemoryTracker()  # the high-water mark is per process, so is its tracker

# glibc serves a block of at least M_MMAP_THRESHOLD bytes with its own mmap and unmaps it on free;
# smaller ones come from the heap. The threshold starts at 128 KiB but glibc raises it (up to 32 MiB)
# each time such a block is freed, so by the first training step every activation tensor comes from
# the heap. Passes of different shapes then leave the heap fragmented: measured on SmolLM2-135M
# (LoRA, 8 rows, CPU) the heap held 3.5 GiB for 2.2 GiB of live tensors, and kept it between steps.
M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
TRAINING_MMAP_THRESHOLD = 1 << 20


@contextlib.contextmanager
def lean_heap(mmap_threshold: int = TRAINING_MMAP_THRESHOLD):
    """For the training loop: tensors of `mmap_threshold` bytes and more get their own mapping, returned
    to the system when freed, so the resident set follows the live tensors instead of the heap's
    high-water mark; the small blocks' heap is kept for reuse and the objects alive at the start are
    frozen out of garbage collection (the tokenization stage's `bulk_allocation`). glibc only;
    elsewhere nothing changes. The cost: fresh pages are faulted in for every large tensor (about
    7 % more CPU time per step on a 2-core VM; bench/training.py measures the net effect).
    """
    from sft_pipeline.tokenization.workers import _glibc, bulk_allocation

    with bulk_allocation():  # sets M_TRIM_THRESHOLD, which also stops glibc's dynamic mmap threshold
        libc = _glibc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        yield


# oneDNN runs a CPU's bf16 matrix products and keeps each compiled plan (a brgemm matmul primitive with its
# ~220 KB descriptor, about 0.6 MiB per matrix shape in all) in two LRU caches of 1024 entries: ideep's
# (LRU_CACHE_CAPACITY) and oneDNN's own (ONEDNN_PRIMITIVE_CACHE_CAPACITY). Padded row groups of varied
# widths bring new shapes almost every step, so at 1024 the caches grew the heap for hundreds of steps
# (the demo: step peaks from 1.5 to 3.0 GiB over 120 steps). One forward/backward pass of a row group uses
# about 30 plans (LoRA on every linear layer of a Llama block); 64 keeps them with room to spare. Measured
# on the demo's rows, 30 steps: the same seconds per step, and the heap's live bytes flat from step 1.
KERNEL_CACHE_CAPACITY = 64
KERNEL_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Cap oneDNN's compiled-plan caches at `capacity` entries each, unless the environment already sets them.

    Both libraries read their variable when the cache is first used, so this takes effect only before
    the process's first bf16 matrix product on a CPU (`build_trainer` calls it before loading the model).
    Returns the values in effect.
    """
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES}


def step_peak_growth_mib(step_peaks: list[float]) -> float | None:
    """How much the step peaks grew over a run: the largest peak of the second half of the steps minus
    the largest of steps 2 .. half (step 1 is warm-up). None with fewer than 4 steps."""
    half = len(step_peaks) // 2
    if half < 2:
        return None
    return round(max(step_peaks[half:]) - max(step_peaks[1:half]), 1)


def peak_memory_mib() -> float:
    """CUDA: max allocated bytes on this device; CPU: the process's peak resident set size (whole run)."""
    return MEMORY.process_peak_mib()


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
