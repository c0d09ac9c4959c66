"""The round-trip checks on a written dataset (CHECK_NAMES): labels decode back to the assistant turns."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.tokenization.config import IGNORE_INDEX, INFO_FILE, SPLITS
from sft_pipeline.tokenization.info import SftDatasetInfo, read_sft_dataset_info
from sft_pipeline.tokenization.tokens import end_of_turn_markers

CHECK_NAMES = ("every_example_trainable", "labels_round_trip", "no_double_bos", "eos_never_masked")


@dataclass
class CheckOutcome:
    """The result of one dataset check: what was looked at, how many rows failed, a few of them."""

    name: str
    passed: bool
    checked: int
    failures: int
    description: str
    examples: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _assistant_contents(messages) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def verify_sft_dataset(path_or_info: str | Path | SftDatasetInfo, model_dir: str | Path, rows=None,
                       max_examples: int = 10) -> dict[str, CheckOutcome]:
    """Re-read a written dataset and prove it trains what it should; one CheckOutcome per check.

    - trainable_tokens: every row has at least one labeled token.
    - labels_round_trip: the labeled tokens, cut after each end-of-turn token and decoded, give back
      the row's assistant contents in order (whitespace aside), each followed by the end-of-turn
      token; a row cut by truncation may end with a shortened, unterminated last turn.
    - single_bos: no row holds two BOS tokens in a row, and rows of a tokenizer that expects a BOS
      start with it.
    - eos_labeled: every complete assistant turn's end-of-turn token is labeled (also when the pad
      token is the EOS).

    rows: the conversations the dataset was built from (`id`, `messages`); test rows carry their
    own messages, so without `rows` only the test split is round-tripped.
    """
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    info = path_or_info if isinstance(path_or_info, SftDatasetInfo) else read_sft_dataset_info(path_or_info)
    if info is None:
        raise FileNotFoundError(f"no complete sft dataset at {path_or_info} (missing {INFO_FILE})")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    markers = end_of_turn_markers(tokenizer)
    eot_ids = np.asarray(sorted({tokenizer.convert_tokens_to_ids(m) for m in markers}), dtype=np.int64)
    bos = tokenizer.bos_token_id
    prefix = np.asarray(info.bos_prefix, dtype=np.int64)
    may_truncate = info.truncation == "truncate"

    contents: dict[str, list[str]] = {}
    if rows is not None:
        for row_id, messages in zip(rows["id"], rows["messages"]):
            contents[str(row_id)] = _assistant_contents(messages)

    fails: dict[str, list[dict[str, Any]]] = {n: [] for n in CHECK_NAMES}
    counts = Counter()
    checked = Counter()
    for split in SPLITS:
        path = info.files[split]
        columns = ["id", "input_ids", "labels", "length"] + (["messages"] if split == "test" else [])
        table = pq.read_table(path, columns=columns)
        n_rows = table.num_rows
        if not n_rows:
            continue
        row_ids = table.column("id").to_pylist()
        if split == "test":
            for row_id, messages in zip(row_ids, table.column("messages").to_pylist()):
                contents.setdefault(row_id, _assistant_contents(messages))
        ids = table.column("input_ids").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.int64)
        labels = table.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = table.column("length").to_numpy().astype(np.int64)
        starts = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        row_of = np.repeat(np.arange(n_rows), lengths)
        lab = labels != IGNORE_INDEX
        truncated_row = (lengths >= info.max_length) if may_truncate else np.zeros(n_rows, dtype=bool)

        def fail(check: str, r: int, detail: str, **more: Any) -> None:
            counts[check] += 1
            if len(fails[check]) < max_examples:
                fails[check].append({"split": split, "id": row_ids[r], "detail": detail, **more})

        # 1. at least one trainable token
        per_row_labeled = np.bincount(row_of[lab], minlength=n_rows)
        checked["every_example_trainable"] += n_rows
        for r in np.flatnonzero(per_row_labeled == 0):
            fail("every_example_trainable", int(r), "no token of this row has a label")

        # 3. BOS
        checked["no_double_bos"] += n_rows
        if bos is not None and len(ids) > 1:
            same_row = row_of[1:] == row_of[:-1]
            double = np.flatnonzero(same_row & (ids[1:] == bos) & (ids[:-1] == bos))
            for r in np.unique(row_of[double]):
                fail("no_double_bos", int(r), "two BOS tokens in a row")
        if len(prefix):
            for r in range(n_rows):
                if lengths[r] < len(prefix) or not np.array_equal(ids[starts[r]:starts[r] + len(prefix)], prefix):
                    fail("no_double_bos", r, f"does not start with the tokenizer's BOS {prefix.tolist()}")

        # 2 and 4. labeled segments, cut after each end-of-turn token
        is_eot = np.isin(ids, eot_ids)
        prev_lab = np.concatenate(([False], lab[:-1]))
        prev_eot = np.concatenate(([False], (lab & is_eot)[:-1]))
        row_first = np.zeros(len(ids), dtype=bool)
        row_first[starts[:-1][lengths > 0]] = True
        seg_start = lab & (~prev_lab | prev_eot | row_first)
        seg_id = np.cumsum(seg_start) - 1
        lab_pos = np.flatnonzero(lab)
        seg_of_lab = seg_id[lab_pos]
        n_seg = int(seg_start.sum())
        seg_begin = np.flatnonzero(seg_start)
        seg_len = np.bincount(seg_of_lab, minlength=n_seg)
        seg_last = seg_begin + seg_len - 1
        seg_row = row_of[seg_begin]
        seg_closed = is_eot[seg_last] if n_seg else np.zeros(0, dtype=bool)
        # A segment's text, without its closing end-of-turn token.
        body_end = seg_last + 1 - seg_closed.astype(np.int64)
        body = [ids[a:b].tolist() for a, b in zip(seg_begin.tolist(), body_end.tolist())]
        texts = tokenizer.batch_decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False) if body else []
        labeled_eot = np.bincount(row_of[lab & is_eot], minlength=n_rows)
        seg_bounds = np.searchsorted(seg_row, np.arange(n_rows + 1), side="left")
        for r in range(n_rows):
            checked["labels_round_trip"] += 1
            checked["eos_never_masked"] += 1
            expected = contents.get(row_ids[r])
            if expected is None:
                fail("labels_round_trip", r, "row id not found among the source conversations")
                continue
            a, b = seg_bounds[r], seg_bounds[r + 1]
            got = texts[a:b]
            closed = seg_closed[a:b].tolist()
            cut = bool(truncated_row[r])
            n_turns = len(expected)
            # eos_labeled: every complete assistant turn ends with a labeled end-of-turn token.
            want_eot = n_turns if not cut else None
            if want_eot is not None and labeled_eot[r] != want_eot:
                fail("eos_never_masked", r, f"{int(labeled_eot[r])} labeled end-of-turn tokens for {n_turns} assistant turns")
            elif cut and labeled_eot[r] < max(0, len(got) - 1):
                fail("eos_never_masked", r, "an inner assistant turn of a truncated row lost its end-of-turn label")
            ok = len(got) == n_turns or (cut and len(got) <= n_turns)
            detail = ""
            if not ok:
                detail = f"{len(got)} labeled spans for {n_turns} assistant turns"
            else:
                for k, (text, content) in enumerate(zip(got, expected)):
                    last = k == len(got) - 1
                    if not closed[k] and not (cut and last):
                        detail = f"assistant turn {k} is not followed by an end-of-turn token"
                        break
                    if cut and last and not closed[k]:
                        if not _squash(content).startswith(_squash(text)):
                            detail = f"truncated assistant turn {k} is not a prefix of the content"
                            break
                    elif _squash(text) != _squash(content):
                        detail = f"assistant turn {k} decodes to something else"
                        break
            if detail:
                fail("labels_round_trip", r, detail, expected=[c[:200] for c in expected], got=[t[:200] for t in got])

    descriptions = {
        "every_example_trainable": "Every example has at least one trainable (labeled) token.",
        "labels_round_trip": "Decoding the labeled spans gives back each assistant turn's content (whitespace "
                             "aside), followed by the end-of-turn token.",
        "no_double_bos": "No example holds a doubled BOS; tokenizers that expect a BOS get exactly one at the start.",
        "eos_never_masked": "The end-of-turn/EOS token closing every assistant turn is labeled, even when pad == EOS.",
    }
    extra = {
        "eos_never_masked": {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                        "pad_equals_eos": tokenizer.pad_token_id is not None
                        and tokenizer.pad_token_id == tokenizer.eos_token_id,
                        "end_of_turn_tokens": markers},
        "no_double_bos": {"bos_token": tokenizer.bos_token, "bos_prefix": info.bos_prefix},
    }
    return {
        name: CheckOutcome(name=name, passed=counts[name] == 0, checked=int(checked[name]), failures=int(counts[name]),
                           description=descriptions[name], examples=fails[name], extra=extra.get(name, {}))
        for name in CHECK_NAMES
    }
