"""Packing examples into fixed-length sequences, and the block-diagonal attention mask that keeps them apart."""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path
from typing import Sequence

from sft_pipeline.hashing import TableHasher, short, text_digest
from sft_pipeline.tokenization.config import IGNORE_INDEX
from sft_pipeline.tokenization.write import PARQUET_WRITE_OPTIONS, _list_array


def _packed_schema():
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.schema([
        ("id", pa.string()), ("input_ids", ints), ("attention_mask", ints), ("labels", ints),
        ("position_ids", ints), ("length", pa.int64()), ("example_ids", pa.list_(pa.string())),
        ("example_lengths", ints),
    ])


def pack_bins(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Best-fit decreasing: row indices grouped into bins of at most pack_length tokens (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    caps: list[int] = []  # sorted distinct remaining capacities that have an open bin
    open_bins: dict[int, list[int]] = {}
    for i in order:
        n = int(lengths[i])
        if n > pack_length:
            raise ValueError(f"row {i} has {n} tokens, more than pack_length={pack_length}")
        k = bisect.bisect_left(caps, n)
        if k < len(caps):
            cap = caps[k]
            b = open_bins[cap].pop()
            if not open_bins[cap]:
                caps.pop(k)
        else:
            cap, b = pack_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = cap - n
        if left >= 2:  # no example is shorter than 2 tokens
            if not open_bins.get(left):
                bisect.insort(caps, left)
                open_bins[left] = []
            open_bins[left].append(b)
    return bins


def packing_efficiency(lengths: Sequence[int], pack_length: int) -> float:
    """Share of real tokens when `lengths` are packed into pack_length sequences (1.0 = no padding)."""
    if not len(lengths):
        return 0.0
    bins = pack_bins(lengths, pack_length)
    return float(sum(int(x) for x in lengths)) / (len(bins) * pack_length)


def write_packed_split(src: str | Path, dst: str | Path, pack_length: int, pad_token_id: int,
                       hasher: TableHasher | None = None) -> int:
    """Pack an unpacked split file into fixed-length sequences; returns the number of sequences.
    `hasher`, when given, is fed the rows written (so the file need not be read back to hash it).

    Each sequence holds whole examples back to back and ends with padding (label -100, attention 0).
    position_ids restart at 0 for every example (and for the padding). To keep examples from
    attending to each other, train with `packed_attention_mask(example_lengths, length)` (a 4D
    block-diagonal causal mask; works with eager and sdpa) or with flash-attention-2, which
    reads the example boundaries from position_ids. The first token of every example is
    unlabeled, so no example learns from the one before it.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src, columns=["id", "input_ids", "labels", "length"])
    row_ids = table.column("id").to_pylist()
    lengths = table.column("length").to_numpy().astype(np.int64)
    ids = table.column("input_ids").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.int32)
    labels = table.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.int32)
    if not len(lengths):
        empty = _packed_schema().empty_table()
        pq.write_table(empty, dst, **PARQUET_WRITE_OPTIONS)
        # The hasher is left untouched: an empty table would open its column streams, and
        # hashing.parquet_digest of the written file (no batches) would then never give it back.
        return 0
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    bins = pack_bins(lengths, pack_length)
    order = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(lengths))
    per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    ordered_len = lengths[order]
    # Gather the examples in bin order.
    gather = np.repeat(starts[:-1][order] - np.concatenate(([0], np.cumsum(ordered_len)[:-1])), ordered_len) \
        + np.arange(int(ordered_len.sum()), dtype=np.int64)
    g_ids, g_labels = ids[gather], labels[gather].copy()
    g_pos = np.arange(len(gather), dtype=np.int64) - np.repeat(np.concatenate(([0], np.cumsum(ordered_len)[:-1])), ordered_len)
    first = np.concatenate(([0], np.cumsum(ordered_len)[:-1]))
    g_labels[first] = IGNORE_INDEX
    # Lay the bins out at fixed length, with padding after each bin's examples.
    bin_real = np.add.reduceat(ordered_len, np.concatenate(([0], np.cumsum(per_bin)[:-1]))) if len(bins) else per_bin
    n_bins = len(bins)
    out_ids = np.full(n_bins * pack_length, pad_token_id, dtype=np.int32)
    out_labels = np.full(n_bins * pack_length, IGNORE_INDEX, dtype=np.int32)
    out_mask = np.zeros(n_bins * pack_length, dtype=np.int32)
    out_pos = np.tile(np.arange(pack_length, dtype=np.int32), n_bins)  # padding restarts at 0 too
    bin_first = np.concatenate(([0], np.cumsum(bin_real)[:-1]))
    dest = np.repeat(np.arange(n_bins, dtype=np.int64) * pack_length - bin_first, bin_real) + np.arange(len(gather))
    out_ids[dest], out_labels[dest], out_mask[dest] = g_ids, g_labels, 1
    pad_start = np.arange(n_bins, dtype=np.int64) * pack_length + bin_real
    pad_len = pack_length - bin_real
    pad_idx = np.repeat(pad_start - np.concatenate(([0], np.cumsum(pad_len)[:-1])), pad_len) + np.arange(int(pad_len.sum()))
    out_pos[dest] = g_pos
    out_pos[pad_idx] = np.arange(len(pad_idx)) - np.repeat(np.concatenate(([0], np.cumsum(pad_len)[:-1])), pad_len)
    fixed = np.full(n_bins, pack_length, dtype=np.int64)
    ex_ids = [[row_ids[i] for i in b] for b in bins]
    pack_names = [f"pack-{short(text_digest(chr(0).join(e)))}" for e in ex_ids]
    schema = _packed_schema()
    cols = [
        pa.array(pack_names, type=pa.string()),
        _list_array(fixed, out_ids), _list_array(fixed, out_mask), _list_array(fixed, out_labels),
        _list_array(fixed, out_pos), pa.array(fixed, type=pa.int64()),
        pa.array(ex_ids, type=pa.list_(pa.string())),
        _list_array(per_bin, ordered_len.astype(np.int32)),
    ]
    table = pa.Table.from_arrays(cols, schema=schema)
    pq.write_table(table, dst, **PARQUET_WRITE_OPTIONS)
    if hasher is not None:
        hasher.update(table)
    return n_bins


def packed_attention_mask(example_lengths: Sequence[int], length: int, dtype=None):
    """A (1, 1, length, length) additive attention mask for one packed sequence: each token sees the
    earlier tokens of its own example only (padding sees only itself). 0 = attend, dtype min = blocked."""
    import torch

    dtype = dtype or torch.float32
    segment = torch.full((length,), -1, dtype=torch.long)
    start = 0
    for k, n in enumerate(int(x) for x in example_lengths):
        segment[start:start + n] = k
        start += n
    same = segment[:, None] == segment[None, :]
    same |= torch.eye(length, dtype=torch.bool)  # padding tokens attend to themselves
    allowed = same & torch.tril(torch.ones(length, length, dtype=torch.bool))
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]
