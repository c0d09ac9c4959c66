"""Conversations and helpers shared by the tokenization unit tests."""

from __future__ import annotations

import pandas as pd

from sft_pipeline.schema import make_row
from sft_pipeline.tokenization.config import IGNORE_INDEX

SINGLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short poem about the sea."},
    {"role": "assistant", "content": "The sea is wide and grey and calm."},
    {"role": "user", "content": "List three ideas for a birthday party."},
    {"role": "assistant", "content": "A picnic, a treasure hunt, a movie night."},
]


def labeled_spans(enc):
    """Runs of consecutive labeled token ids."""
    spans, cur = [], []
    for tok_id, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def make_rows(n: int, long_every: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(n):
        answer = f"Answer number {i}: Paris is the capital of France."
        if long_every and i % long_every == 0:
            answer = " ".join(["The sea is wide and grey and calm."] * 40)
        rows.append(make_row([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}],
                             source="unit"))
    return pd.DataFrame(rows)


def random_conversations(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    words = ["Paris", "sea", "  spaced ", "\n\nnew", "émoji 😀", "code:\n    x = 1", "tab\t", "end.", "calm"]
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": " ".join(rng.choices(words, k=3))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(0, 6)))})
        out.append(msgs)
    return out



CONTENT_DEPENDENT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if 'Paris' in m['content'] %}[city] {% endif %}"
    "{{ m['content'] | trim }}{{ '<|im_end|>\n' }}{% endfor %}"
)


# Branches on the content without changing it: the skeleton builds, the proof fails, rows are rendered.
CONTENT_BRANCH = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if 'Paris' in m['content'] %}[city] {% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
)
