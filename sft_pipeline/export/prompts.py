"""The fixed held-out prompts every export must answer like the registered model: token ids, so each model sees
exactly the context the registered model saw (no re-rendering, no tokenizer round trip)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

# Used only when the version's test split is gone: instructions unlike the seed data, rendered with the chat template.
FALLBACK_INSTRUCTIONS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "List two uses of a paperclip.",
    "Classify the sentiment: I hate waiting in line.",
    "Summarize: The cat sat on the mat all day.",
)


@dataclass(frozen=True)
class PromptSet:
    """Prompt token ids (chat-templated, up to the generation prompt), their text, and where they came from."""

    ids: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]
    source: str  # "test split <path>" or "built-in instructions"

    def __len__(self) -> int:
        return len(self.ids)


def held_out_prompts(test_split: str | Path, tokenizer: Any, n: int) -> PromptSet | None:
    """The first `n` rows of a tokenized test split (ordered by id), cut before their first labeled token: the
    conversation up to and including the assistant header, as training rendered it. None when the file has no
    usable rows."""
    import pandas as pd

    frame = pd.read_parquet(test_split)
    if not {"input_ids", "labels"} <= set(frame.columns) or frame.empty:
        return None
    if "id" in frame.columns:
        frame = frame.sort_values("id", kind="stable")
    ids: list[tuple[int, ...]] = []
    for input_ids, labels in zip(frame["input_ids"], frame["labels"]):
        input_ids, labels = list(input_ids), list(labels)
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not first:  # nothing labeled, or nothing before the answer
            continue
        prompt = tuple(int(t) for t in input_ids[:first])
        if prompt not in ids:
            ids.append(prompt)
        if len(ids) == n:
            break
    if not ids:
        return None
    texts = tuple(tokenizer.decode(list(p), skip_special_tokens=False) for p in ids)
    return PromptSet(ids=tuple(ids), texts=texts, source=f"test split {Path(test_split)}")


def fallback_prompts(tokenizer: Any, n: int) -> PromptSet:
    """Built-in instructions rendered with the tokenizer's chat template (plain text when it has none)."""
    ids, texts = [], []
    for instruction in FALLBACK_INSTRUCTIONS[:n]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                 add_generation_prompt=True)
            bos = getattr(tokenizer, "bos_token", None)
            encoded = tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
        else:
            text = instruction
            encoded = tokenizer.encode(text)
        ids.append(tuple(int(t) for t in encoded))
        texts.append(text)
    return PromptSet(ids=tuple(ids), texts=tuple(texts), source="built-in instructions")


def export_prompts(test_split: str | Path | None, tokenizer: Any, n: int) -> PromptSet:
    """Held-out prompts from the version's test split when it is there, else the built-in ones."""
    if test_split is not None:
        prompts = held_out_prompts(test_split, tokenizer, n)
        if prompts is not None:
            return prompts
    return fallback_prompts(tokenizer, n)
