"""Building the dataset folder (tokenize, split, write, pack, record), and reusing one by fingerprint."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterable

from sft_pipeline.hashing import TableHasher, combine_digests
from sft_pipeline.tokenization.config import (
    DROPPED_FILE, IGNORE_INDEX, INFO_FILE, PACKED_SPLITS, SPLITS, TokenizationConfig,
)
from sft_pipeline.tokenization.encode import ConversationEncoder
from sft_pipeline.tokenization.fingerprint import fingerprint
from sft_pipeline.tokenization.info import SftDatasetInfo, read_sft_dataset_info
from sft_pipeline.tokenization.pack import packing_efficiency, write_packed_split
from sft_pipeline.tokenization.render import normalize_messages
from sft_pipeline.tokenization.templates import resolve_template
from sft_pipeline.tokenization.tokens import _special_prefix
from sft_pipeline.tokenization.workers import _encode_chunk, _worker_init, bulk_allocation
from sft_pipeline.tokenization.write import _SplitWriter, assign_split


def _histogram(lengths: Iterable[int], max_length: int) -> dict[str, int]:
    import numpy as np

    edges, edge = [], 32
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    edges.append(max_length)
    lows = [1] + [e + 1 for e in edges[:-1]]
    values = np.fromiter(lengths, dtype=np.int64)
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)
    return {f"{lo}-{hi}": int(c) for lo, hi, c in zip(lows, edges, counts[: len(edges)])}


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def build_sft_dataset(
    rows, model_dir: str | Path, out_dir: str | Path, cfg: TokenizationConfig | None = None,
    fingerprint_value: str = "",
) -> SftDatasetInfo:
    """Tokenize canonical rows with the tokenizer in `model_dir`, write train/validation/test Parquet.

    rows: DataFrame with `id` and `messages`. Writes `{split}.parquet` (id, input_ids, attention_mask,
    labels, length; test also keeps messages), `dropped.parquet` (id, reason, detail), with
    `packing` also `{train,validation}.packed.parquet`, and sft_dataset_info.json into `out_dir`,
    replacing what was there (built beside it and renamed into place). Raises ValueError for a
    malformed row (naming its id) or when no row would land in train.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    began = time.perf_counter()
    cfg = cfg or TokenizationConfig()
    cfg.validate()
    if len(rows) == 0:
        raise ValueError("build_sft_dataset got no rows")
    for column in ("id", "messages"):
        if column not in rows:
            raise ValueError(f"build_sft_dataset: rows lack the column {column!r} (have {list(rows.columns)})")
    model_dir = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template, template_name = resolve_template(tokenizer, cfg.template)
    key = (model_dir, cfg.template, cfg.system_prompt, cfg.max_length, cfg.truncation, cfg.control_tokens_in_content)

    all_ids = [str(x) for x in rows["id"]]
    all_messages = list(rows["messages"])
    # Same id = same conversation (ids are content hashes): keep the first, report the others.
    seen: set[str] = set()
    unique, dropped_rows = [], []
    for i, row_id in enumerate(all_ids):
        if row_id in seen:
            dropped_rows.append({"id": row_id, "reason": "duplicate_id", "detail": f"row {i} repeats an earlier id"})
        else:
            seen.add(row_id)
            unique.append(i)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writers = {s: _SplitWriter(tmp / f"{s}.parquet", s == "test") for s in SPLITS}
        split_code = {"train": 0, "validation": 1, "test": 2}
        chunks = [(key, [all_ids[i] for i in unique[a:b]], [all_messages[i] for i in unique[a:b]])
                  for a, b in _batches(len(unique), cfg.batch_size)]
        workers = cfg.num_workers or os.cpu_count() or 1
        workers = min(workers, len(chunks))
        if workers > 1:
            import concurrent.futures
            import multiprocessing

            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            results = pool.map(_encode_chunk, chunks)
        else:
            pool = None
            encoder = ConversationEncoder(tokenizer, template, cfg.system_prompt, cfg.max_length, cfg.truncation,
                                          cfg.control_tokens_in_content)
            results = (encoder.encode(conv, ids) for _, ids, conv in chunks)

        truncated = fast = slow = 0
        verbatim = True
        eot: Counter = Counter()
        lengths_all, trainable = [], 0
        try:
            with bulk_allocation():
                for (_, chunk_ids, chunk_msgs), batch in zip(chunks, results):
                    truncated += batch.truncated
                    fast += batch.fast_rows
                    verbatim &= batch.template_verbatim
                    slow += batch.slow_rows
                    eot.update(batch.end_of_turn)
                    for pos, reason, detail in batch.dropped:
                        dropped_rows.append({"id": chunk_ids[pos], "reason": reason, "detail": detail})
                    if not len(batch.kept):
                        continue
                    kept_ids = [chunk_ids[p] for p in batch.kept.tolist()]
                    codes = np.fromiter((split_code[assign_split(i, cfg.validation_fraction, cfg.test_fraction)]
                                         for i in kept_ids), dtype=np.int8, count=len(kept_ids))
                    tok_codes = np.repeat(codes, batch.lengths)
                    trainable += int(np.count_nonzero(batch.labels != IGNORE_INDEX))
                    lengths_all.append(batch.lengths)
                    for split, code in split_code.items():
                        sel = np.flatnonzero(codes == code)
                        if not len(sel):
                            continue
                        tok = tok_codes == code
                        messages = None
                        if split == "test":
                            messages = [normalize_messages(chunk_msgs[batch.kept[j]], cfg.system_prompt) for j in sel]
                        writers[split].write([kept_ids[j] for j in sel], batch.lengths[sel],
                                             batch.input_ids[tok], batch.labels[tok], messages)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            for w in writers.values():
                w.close()

        splits = {s: writers[s].rows for s in SPLITS}
        lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, dtype=np.int64)
        num_tokens = int(lengths.sum())
        if splits["train"] == 0:
            reasons = Counter(d["reason"] for d in dropped_rows)
            raise ValueError(
                f"the train split would be empty: {len(rows)} rows in, {len(dropped_rows)} dropped "
                f"({dict(reasons)}; max_length={cfg.max_length}, truncation={cfg.truncation}), "
                f"{sum(splits.values())} kept, all in validation/test. Add rows, raise max_length, or lower "
                "validation_fraction/test_fraction."
            )
        pq.write_table(pa.Table.from_pylist(dropped_rows, schema=pa.schema(
            [("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])), tmp / DROPPED_FILE)

        pack_length = cfg.effective_pack_length
        train_lengths = np.concatenate(writers["train"].lengths)
        efficiency = packing_efficiency(train_lengths, pack_length)
        packed_files, packed_sequences, packed_hashers = {}, {}, {}
        if cfg.packing:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            for split in PACKED_SPLITS:
                name = f"{split}.packed.parquet"
                packed_hashers[name] = TableHasher()
                packed_sequences[split] = write_packed_split(tmp / f"{split}.parquet", tmp / name, pack_length, pad_id,
                                                             packed_hashers[name])
                packed_files[split] = str(out_dir / name)

        digests = {f"{s}.parquet": writers[s].hasher.hexdigest() for s in SPLITS}
        digests.update({name: hasher.hexdigest() for name, hasher in packed_hashers.items()})
        seconds = time.perf_counter() - began
        info = SftDatasetInfo(
            path=str(out_dir),
            splits=splits,
            files={s: str(out_dir / f"{s}.parquet") for s in SPLITS},
            num_tokens=num_tokens,
            trainable_tokens=trainable,
            truncated=truncated,
            dropped=len(dropped_rows),
            max_length=cfg.max_length,
            template_name=template_name,
            length_histogram=_histogram(lengths.tolist(), cfg.max_length),
            truncation=cfg.truncation,
            dropped_reasons=dict(Counter(d["reason"] for d in dropped_rows)),
            rows_in=len(rows),
            fingerprint=fingerprint_value,
            content_hash=combine_digests(digests),
            trainable_token_share=round(trainable / num_tokens, 6) if num_tokens else 0.0,
            packing_efficiency=round(efficiency, 6),
            pack_length=pack_length,
            packed_files=packed_files,
            packed_sequences=packed_sequences,
            end_of_turn_tokens=dict(eot),
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            bos_prefix=_special_prefix(tokenizer),
            system_prompt=cfg.system_prompt,
            fast_path_rows=fast,
            template_verbatim=verbatim,
            slow_path_rows=slow,
            config=cfg.output_dict(),
            seconds=round(seconds, 3),
            tokens_per_second=round(num_tokens / seconds, 1) if seconds > 0 else 0.0,
        )
        (tmp / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def materialize_sft_dataset(
    rows, model_dir: str | Path, root: str | Path, cfg: TokenizationConfig | None = None
) -> SftDatasetInfo:
    """The dataset for (rows, tokenizer, template, cfg) in `root/<fingerprint>/`: reused when it is
    already complete there (reused=True, nothing tokenized), built otherwise."""
    cfg = cfg or TokenizationConfig()
    fp = fingerprint(rows, model_dir, cfg)
    out_dir = Path(root) / fp
    existing = read_sft_dataset_info(out_dir)
    if existing is not None and existing.fingerprint == fp:
        existing.reused = True
        return existing
    return build_sft_dataset(rows, model_dir, out_dir, cfg, fingerprint_value=fp)
