"""Row builders and helpers shared by the curation tests."""

import numpy as np

from sft_pipeline.ingest.frames import rows_frame
from sft_pipeline.schema import make_row


def row(user, assistant, *, index=0, system=None, source="t"):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    return make_row(messages, source=source, source_file=f"{source}.jsonl", source_index=index)


def frame(*rows):
    return rows_frame(list(rows))


def reasons_by_index(rejected):
    return dict(zip(rejected["source_index"], rejected["reason"]))


def long_text(seed, n=60):
    rng = np.random.default_rng(seed)
    return " ".join(f"w{x}" for x in rng.integers(0, 100_000, size=n))
