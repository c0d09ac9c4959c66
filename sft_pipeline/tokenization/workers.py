"""Worker processes that encode batches in parallel, and the allocator settings for the batch loop."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

from sft_pipeline.tokenization.encode import ConversationEncoder, EncodedBatch
from sft_pipeline.tokenization.templates import resolve_template


@lru_cache(maxsize=4)
def _worker_encoder(model_dir: str, template: str, system_prompt: str | None, max_length: int,
                    truncation: str, policy: str) -> ConversationEncoder:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text, _ = resolve_template(tokenizer, template)
    return ConversationEncoder(tokenizer, text, system_prompt, max_length, truncation, policy)


def _encode_chunk(args) -> EncodedBatch:
    key, row_ids, conversations = args
    return _worker_encoder(*key).encode(conversations, row_ids)


def _worker_init() -> None:
    # Several processes: each tokenizes on one thread, or they fight over the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _set_heap_trim_threshold(HEAP_TRIM_THRESHOLD)  # a worker process only tokenizes: keep its heap


# glibc hands freed heap back to the OS once more than M_TRIM_THRESHOLD bytes are free at its top.
# Each batch frees its encodings (~100 MB for 4096 conversations), so the next batch faults the
# same memory back in, page by page: measured on this project's 2-core VM, 10-20 % of the encode
# time at batch_size 4096 in bench/tokenization.py. While the stage runs the threshold is
# raised; afterwards it is set back and the freed heap is returned at once. (Setting it also ends
# glibc's dynamic mmap threshold for the process: large blocks keep using mmap from 128 KiB up.)
HEAP_TRIM_THRESHOLD = 1 << 30
_GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt parameter number, from glibc's malloc.h


@lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _set_heap_trim_threshold(nbytes: int) -> bool:
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_TRIM_THRESHOLD, nbytes))


@contextlib.contextmanager
def bulk_allocation():
    """For the batch loop: freed heap stays in the process for the next batch (glibc; elsewhere
    nothing changes), and the objects alive when the loop starts (every conversation) are frozen
    out of garbage collection, so the collections the loop's millions of allocations trigger do
    not walk them again each time (about 1 % of the stage at 100k rows). Cycles made inside the
    loop (slow-path Jinja renders) are still collected. Both are undone on exit."""
    import gc

    raised = _set_heap_trim_threshold(HEAP_TRIM_THRESHOLD)
    froze = gc.get_freeze_count() == 0  # someone else's freeze is left alone
    if froze:
        gc.freeze()
    try:
        yield
    finally:
        if froze:
            gc.unfreeze()
        if raised:
            _set_heap_trim_threshold(_GLIBC_DEFAULT_TRIM_THRESHOLD)
            _glibc().malloc_trim(0)
