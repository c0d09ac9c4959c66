"""Tests for sft_pipeline.tokenization.workers: the batch loop's allocator settings are undone."""

from __future__ import annotations

import pytest

from sft_pipeline.tokenization import workers


def test_bulk_allocation_restores_gc_and_heap_settings():
    import gc
    import platform

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert workers._set_heap_trim_threshold(workers._GLIBC_DEFAULT_TRIM_THRESHOLD) is on_glibc
    assert gc.get_freeze_count() == 0
    with workers.bulk_allocation():
        assert gc.get_freeze_count() > 0 and gc.isenabled()
        kept = [bytearray(1 << 20) for _ in range(8)]  # allocations inside the block work as usual
    assert gc.get_freeze_count() == 0 and sum(len(b) for b in kept) == 8 << 20
    with pytest.raises(RuntimeError), workers.bulk_allocation():
        raise RuntimeError("a failing batch")
    assert gc.get_freeze_count() == 0
