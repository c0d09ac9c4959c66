"""Peak memory per training step: recorded in the history, and flat from step to step (no growth after warm-up)."""

from __future__ import annotations

import pytest

from sft_pipeline.training import train
from sft_pipeline.training.performance import MEMORY
from tests.unit.training.helpers import make_cfg

STEPS = 12
# The demo's training grew its peak RSS from 7.4 to 8.9 GiB in 20 steps (about 75 MiB a step). Over
# steps 2..12 a flat run stays within a few MiB; 16 MiB in all is what a leak of 2 MiB a step would exceed.
TOLERANCE_MIB = 16.0


def _resettable() -> bool:
    MEMORY.begin()
    return MEMORY.interval_peak_mib() is not None


def _growth(history) -> float:
    """Peak of steps 3..N above that of step 2 (step 1 is warm-up: optimizer state, first allocations)."""
    peaks = {h["step"]: h["peak_memory_mib"] for h in history if "peak_memory_mib" in h}
    assert sorted(peaks) == list(range(1, STEPS + 1)), "one peak per step (logging_steps=1)"
    return max(peaks[s] for s in range(3, STEPS + 1)) - peaks[2]


def _leaky_callback(mib_per_step: int):
    from transformers import TrainerCallback

    class Leak(TrainerCallback):
        held: list[bytes] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.held.append(b"\x01" * (mib_per_step << 20))  # written, so resident

    return Leak()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="measures CPU training's resident set")
@pytest.mark.skipif(not _resettable(), reason="needs a resettable RSS high-water mark (/proc/self/clear_refs)")
def test_peak_rss_is_flat_across_steps(tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "flat", max_steps=STEPS, eval_steps=4,
                   early_stopping_patience=0, load_best_model_at_end=False)
    result = train(cfg)
    assert result.batching == "length_grouped"  # the CPU default
    growth = _growth(result.history)
    assert growth <= TOLERANCE_MIB, f"peak RSS grew {growth:.1f} MiB from step 2 to step {STEPS}"
    assert all(h.get("eval_peak_memory_mib", 1) > 0 for h in result.history)
    assert result.peak_memory_mib >= max(h["peak_memory_mib"] for h in result.history)

    # The same measurement catches a leak of 4 MiB a step (a twentieth of the demo's growth).
    import sft_pipeline.training.trainer as trainer_module

    build = trainer_module.build_trainer
    monkeypatch.setattr(trainer_module, "build_trainer",
                        lambda c, callbacks=None: build(c, callbacks=[*(callbacks or []), _leaky_callback(4)]))
    leaky = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "leaky", max_steps=STEPS, eval_steps=4,
                           early_stopping_patience=0, load_best_model_at_end=False))
    assert _growth(leaky.history) > TOLERANCE_MIB


def test_metadata_shows_the_step_peaks():
    from sft_pipeline.training import TrainingResult, materialization_metadata

    history = [{"step": s, "loss": 1.0, "peak_memory_mib": 900.0 + (5.0 if s == 1 else 0.0)} for s in range(1, 9)]
    result = TrainingResult(output_dir="o", method="lora", adapter_dir="a", model_dir=None, base_model_dir="b",
                            train_loss=1.0, mean_train_loss=1.0, eval_loss=None, history=history, global_step=8,
                            trainable_parameters=1, total_parameters=2, train_rows=8, validation_rows=0,
                            tokens_seen=10, train_runtime_s=1.0, tokens_per_second=10.0, peak_memory_mib=950.0)
    meta = materialization_metadata(result)
    assert meta["first_step_peak_memory_mib"] == 905.0 and meta["last_step_peak_memory_mib"] == 900.0
    assert meta["step_peak_memory_growth_mib"] == 0.0


# bf16 matrix products of 300 distinct shapes, as padded row groups of varied widths bring; prints the growth
# of the heap's live bytes (glibc's mallinfo2) in MiB.
_DISTINCT_SHAPES = """
import ctypes, sys
if sys.argv[1] == "bounded":
    from sft_pipeline.training.performance import bound_kernel_caches
    bound_kernel_caches()
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

from sft_pipeline.tokenization.workers import _glibc

libc = _glibc()
libc.mallinfo2.restype = MallInfo2
weight = torch.randn(576, 576, dtype=torch.bfloat16)
before = libc.mallinfo2().uordblks
for rows in range(1, 301):
    torch.randn(rows, 576, dtype=torch.bfloat16) @ weight
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


def _heap_growth_mib(mode: str, env: dict[str, str]) -> float:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _DISTINCT_SHAPES, mode], capture_output=True, text=True, env=env,
                          check=True)
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="reads glibc's mallinfo2")
def test_bounded_kernel_caches_stop_the_heap_growing_with_new_shapes():
    import os

    from sft_pipeline.training.performance import KERNEL_CACHE_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES}
    library_default = _heap_growth_mib("library_default", {**env, **dict.fromkeys(KERNEL_CACHE_VARIABLES, "1024")})
    if library_default < 50:
        pytest.skip(f"bf16 matrix products on this CPU do not go through oneDNN's plan caches "
                    f"(300 shapes grew the heap {library_default:.1f} MiB)")
    bounded = _heap_growth_mib("bounded", env)
    # At 1024 entries each new shape keeps ~0.6 MiB of plans; at 64 the caches are full after 64 shapes.
    assert bounded < library_default / 3, f"heap grew {bounded:.1f} MiB bounded, {library_default:.1f} MiB unbounded"


def test_bound_kernel_caches_leaves_a_value_the_user_set(monkeypatch):
    from sft_pipeline.training.performance import KERNEL_CACHE_CAPACITY, bound_kernel_caches

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert bound_kernel_caches() == {"LRU_CACHE_CAPACITY": "512",
                                     "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(KERNEL_CACHE_CAPACITY)}
