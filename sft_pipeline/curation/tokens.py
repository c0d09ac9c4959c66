"""Token counts of conversations: a Hugging Face tokenizer, or a regex estimate when none is configured."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# The approximate token count: words cut into pieces of at most 6 characters, plus each
# punctuation mark. Close to a BPE tokenizer's count on English prose (within about a third).
_TOKEN_PIECE = re.compile(r"\w{1,6}|[^\w\s]", re.UNICODE)


def approx_token_count(text: str) -> int:
    """The regex token estimate used when no tokenizer is configured."""
    return len(_TOKEN_PIECE.findall(text))


class TokenCounter:
    """Counts tokens of whole conversations: with a Hugging Face tokenizer, or the regex estimate."""

    def __init__(self, tokenizer: str = ""):
        self.name = tokenizer or "approx"
        self._tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except (OSError, ValueError) as err:
                raise ValueError(f"tokenizer {tokenizer!r} could not be loaded (a local tokenizer folder or a hub id is expected): {err}") from err

    def count(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        if self._tokenizer is None:
            return np.fromiter((approx_token_count(t) for t in texts), dtype=np.int64, count=len(texts))
        counts = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            ids = self._tokenizer(batch, add_special_tokens=False)["input_ids"]
            counts[start : start + len(batch)] = [len(x) for x in ids]
        return counts
