"""Building the dataset folder (tokenize, split, write, pack, record), and reusing one by fingerprint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterable

from sft_pipeline.hashing import TableHasher, combine_digests
from sft_pipeline.outputs import STAGING_PREFIX, _fsync_dir, fsync_files, remove_abandoned_staging, staging_folder
from sft_pipeline.tokenization.config import (
    DROPPED_FILE, IGNORE_INDEX, INFO_FILE, PACKED_SPLITS, SPLITS, TokenizationConfig,
)
from sft_pipeline.tokenization.encode import ConversationEncoder
from sft_pipeline.tokenization.fingerprint import fingerprint
from sft_pipeline.tokenization.info import SftDatasetInfo, find_damage, read_sft_dataset_info
from sft_pipeline.tokenization.pack import packing_efficiency, write_packed_split
from sft_pipeline.tokenization.render import normalize_messages
from sft_pipeline.tokenization.templates import resolve_template
from sft_pipeline.tokenization.tokens import _special_prefix
from sft_pipeline.tokenization.workers import _encode_chunk, _worker_init, bulk_allocation
from sft_pipeline.tokenization.write import _SplitWriter, assign_split

logger = logging.getLogger(__name__)


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


def _drop_hints(cfg: TokenizationConfig) -> dict[str, str]:
    return {
        "too_long": f"longer than max_length={cfg.max_length} tokens with truncation='{cfg.truncation}': raise "
                    "max_length, or set truncation='truncate'",
        "no_labels_after_truncation": f"no assistant token left within max_length={cfg.max_length} after "
                                      "truncation: raise max_length",
        "control_token_in_content": "a message holds a control token (control_tokens_in_content='drop'): clean "
                                    "those rows upstream",
        "duplicate_id": "the same conversation more than once in the input (human and synthetic rows overlap)",
    }


def check_dropped_share(rows_in: int, dropped_reasons: dict[str, int], cfg: TokenizationConfig,
                        examples: dict[str, str] | None = None) -> None:
    """Raise ValueError when more than cfg.max_dropped_share of `rows_in` rows were dropped, naming each
    reason with its count and the setting that decides it: training on the few rows left would pass
    every later check while learning next to nothing."""
    dropped = sum(dropped_reasons.values())
    if not rows_in or dropped / rows_in <= cfg.max_dropped_share:
        return
    hints = _drop_hints(cfg)
    causes = []
    for reason, count in sorted(dropped_reasons.items(), key=lambda item: -item[1]):
        cause = f"{reason}: {count} ({hints.get(reason, 'see dropped.parquet')})"
        if examples and reason in examples:
            cause += f", e.g. {examples[reason]}"
        causes.append(cause)
    raise ValueError(
        f"sft_dataset would drop {dropped} of {rows_in} rows ({dropped / rows_in:.1%}), more than "
        f"max_dropped_share={cfg.max_dropped_share}: " + "; ".join(causes) + ". Fix the cause, or raise "
        "max_dropped_share to accept it."
    )


def _sound_copy_of(out_dir: Path, info: SftDatasetInfo, cfg: TokenizationConfig) -> bool:
    """Whether `out_dir` already holds a complete, undamaged copy of what `info` describes."""
    try:
        theirs = read_sft_dataset_info(out_dir)
    except (ValueError, TypeError, KeyError, OSError):
        return False
    return (theirs is not None and theirs.content_hash == info.content_hash
            and find_damage(theirs, cfg.reuse_full_hash_max_bytes) is None)


def _publish(staged: Path, out_dir: Path, info: SftDatasetInfo, cfg: TokenizationConfig) -> None:
    """Rename the staged folder to `out_dir` without a moment where a reader sees a half-replaced folder.

    Another process may have published the same fingerprint meanwhile: its copy is kept when it is
    complete and sound (same content; removing it could pull files from under its readers). A folder
    that is damaged or holds other content is first renamed aside (one atomic step) and then deleted;
    the aside name is a staging name, so a crash in between leaves nothing that a later run trusts.
    """
    fsync_files(staged)
    if out_dir.exists():
        if _sound_copy_of(out_dir, info, cfg):
            shutil.rmtree(staged, ignore_errors=True)
            return
        aside = out_dir.parent / f"{STAGING_PREFIX}{os.getpid()}-replaced-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(out_dir, aside)
        except FileNotFoundError:  # another writer moved it aside first
            pass
        else:
            shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(staged, out_dir)
    except OSError as exc:
        # Another writer published between our check and our rename.
        if _sound_copy_of(out_dir, info, cfg):
            shutil.rmtree(staged, ignore_errors=True)
            return
        raise RuntimeError(
            f"could not publish the dataset at {out_dir}: another process published a different or damaged "
            "copy there meanwhile; rematerialize to check and rebuild it"
        ) from exc
    _fsync_dir(out_dir.parent)


def build_sft_dataset(
    rows, model_dir: str | Path, out_dir: str | Path, cfg: TokenizationConfig | None = None,
    fingerprint_value: str = "",
) -> SftDatasetInfo:
    """Tokenize canonical rows with the tokenizer in `model_dir`, write train/validation/test Parquet.

    rows: DataFrame with `id` and `messages`. Writes `{split}.parquet` (id, input_ids, attention_mask,
    labels, length; test also keeps messages), `dropped.parquet` (id, reason, detail), with
    `packing` also `{train,validation}.packed.parquet`, and sft_dataset_info.json into `out_dir`,
    replacing what was there (built in a staging folder `.tmp-<pid>-...` beside it and renamed into
    place, see _publish). Raises ValueError for a malformed row (naming its id), an invalid chat
    template (naming its file and line), when no row would land in train, or when more than
    cfg.max_dropped_share of the rows are dropped; nothing is published then.
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
    with staging_folder(out_dir.parent) as tmp:
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
        examples = {}
        for d in dropped_rows:
            examples.setdefault(d["reason"], f"row {d['id']}: {d['detail']}")
        check_dropped_share(len(rows), dict(Counter(d["reason"] for d in dropped_rows)), cfg, examples)
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
        written = [f"{s}.parquet" for s in SPLITS] + list(packed_hashers) + [DROPPED_FILE]
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
            file_sizes={name: (tmp / name).stat().st_size for name in written},
            file_digests=digests,
            seconds=round(seconds, 3),
            tokens_per_second=round(num_tokens / seconds, 1) if seconds > 0 else 0.0,
        )
        (tmp / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
        _publish(tmp, out_dir, info, cfg)
    return info


def materialize_sft_dataset(
    rows, model_dir: str | Path, root: str | Path, cfg: TokenizationConfig | None = None
) -> SftDatasetInfo:
    """The dataset for (rows, tokenizer, template, cfg) in `root/<fingerprint>/`: reused when it is
    already complete and undamaged there (reused=True, nothing tokenized; see info.find_damage), built
    otherwise; a damaged one is rebuilt, with a warning saying why. Staging folders of dead processes
    under `root` are removed. Raises ValueError when the dataset (built or reused) dropped more than
    cfg.max_dropped_share of its rows."""
    cfg = cfg or TokenizationConfig()
    root = Path(root)
    remove_abandoned_staging(root)
    fp = fingerprint(rows, model_dir, cfg)
    out_dir = root / fp
    try:
        existing = read_sft_dataset_info(out_dir)
    except (ValueError, TypeError, KeyError, OSError) as exc:  # a cut or edited info file
        existing = None
        logger.warning("rebuilding the sft dataset at %s instead of reusing it: its %s cannot be read (%s)",
                       out_dir, INFO_FILE, exc)
    if existing is not None and existing.fingerprint == fp:
        check_dropped_share(existing.rows_in, existing.dropped_reasons, cfg)
        damage = find_damage(existing, cfg.reuse_full_hash_max_bytes)
        if damage is None:
            existing.reused = True
            return existing
        logger.warning("rebuilding the sft dataset at %s instead of reusing it: %s", out_dir, damage)
    return build_sft_dataset(rows, model_dir, out_dir, cfg, fingerprint_value=fp)
