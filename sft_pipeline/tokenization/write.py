"""Split assignment by row id, and writing split Parquet files while hashing their rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_pipeline.hashing import TableHasher, short, text_digest

# How split files are written: zstd without dictionary pages (token ids have too many distinct values
# for dictionaries to pay). Measured on 16k tokenized rows: a third of the default (snappy +
# dictionary) size, faster to write and to read.
PARQUET_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": False}


def split_position(row_id: str) -> float:
    """A number in [0, 1) from sha256 of the id: the row's fixed place on the split line."""
    return int(short(text_digest(str(row_id))), 16) / 2**64


def assign_split(row_id: str, validation_fraction: float, test_fraction: float) -> str:
    """"train", "validation" or "test" for a row, from its id alone (adding rows never moves one)."""
    x = split_position(row_id)
    if x < test_fraction:
        return "test"
    if x < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _arrow_schema(with_messages: bool):
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    cols = [
        ("id", pa.string()), ("input_ids", ints), ("attention_mask", ints), ("labels", ints), ("length", pa.int64()),
    ]
    if with_messages:
        cols.append(("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
    return pa.schema(cols)


def _list_array(lengths, values):
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a batch holds more than 2**31 tokens; lower batch_size")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


class _SplitWriter:
    """Appends batches of rows to one split's Parquet file, hashing them on the way (no re-read)."""

    def __init__(self, path: Path, with_messages: bool):
        import pyarrow.parquet as pq

        self.schema = _arrow_schema(with_messages)
        self.writer = pq.ParquetWriter(path, self.schema, **PARQUET_WRITE_OPTIONS)
        self.hasher = TableHasher()
        self.lengths: list[Any] = []
        self.rows = 0

    def write(self, ids: list[str], lengths, input_ids, labels, messages=None) -> None:
        import numpy as np
        import pyarrow as pa

        cols = [
            pa.array(ids, type=pa.string()),
            _list_array(lengths, input_ids),
            _list_array(lengths, np.ones(len(input_ids), dtype=np.int32)),
            _list_array(lengths, labels),
            pa.array(lengths, type=pa.int64()),
        ]
        if messages is not None:
            cols.append(pa.array(messages, type=self.schema.field("messages").type))
        table = pa.Table.from_arrays(cols, schema=self.schema)
        self.writer.write_table(table)
        self.hasher.update(table)
        self.lengths.append(lengths)
        self.rows += len(ids)

    def close(self) -> None:
        self.writer.close()
