"""ConversationEncoder: render, tokenize and label a batch of conversations (fast path, slow path, length policy).

Labels are -100 everywhere except the content of every assistant turn and the end-of-turn/EOS
token that closes it, so the loss teaches the model to answer and to stop.

How assistant spans are found (both paths give identical results; tests compare them):

- **Fast path.** Once per template and role sequence (e.g. system/user/assistant), the template is
  rendered on a *skeleton* conversation whose contents are unique sentinels. That gives the
  template's literal pieces between contents, where every assistant turn's content sits, and
  which end-of-turn marker closes it (prefix renders of the skeleton define each turn's
  segment). A real conversation is then assembled by concatenation, and its spans are known
  from the content lengths. Every conversation is *also* rendered with the real template and
  compared with the assembly (unless the template is proved verbatim, see verbatim.py): a
  template whose output depends on the content (trimming, branching) fails the comparison and
  that conversation takes the slow path. Nothing is assumed that is not verified.
- **Slow path** (reference, render.py): the conversation is rendered prefix by prefix (works with
  any prefix-stable template, including ones without `{% generation %}` markers, like SmolLM2's).

All rendered texts of a batch go through ONE batched fast-tokenizer call (`encode_batch`, no
special tokens: the template writes them), character spans map to tokens with
`char_to_token`, and the rest (EOS/BOS insertion, masking, truncation) is vectorized with numpy
over the flat token array of the batch.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from sft_pipeline.tokenization.config import IGNORE_INDEX, TokenizationConfig
from sft_pipeline.tokenization.render import _render, _span_after_content, normalize_messages, render_with_spans
from sft_pipeline.tokenization.templates import resolve_template
from sft_pipeline.tokenization.tokens import _special_prefix, control_tokens, end_of_turn_markers
from sft_pipeline.tokenization.verbatim import template_writes_content_verbatim

_SENTINEL_RE = re.compile(" \n\ue000Aa<&'\"(\\d+)\ue001\n ")


def _sentinel(i: int) -> str:
    # Surrounding blanks, mixed case and HTML characters: a template that trims, changes case or
    # escapes content renders the sentinel differently, and then the fast path is not used.
    return f" \n\ue000Aa<&'\"{i}\ue001\n "


@dataclass
class _Skeleton:
    """Literal pieces of a rendered conversation with a given role sequence, and where spans are."""

    pieces: list[Any]  # str literals and int message indices, in render order
    # Per assistant turn: (index into pieces of its content, end offset after the content, needs_eos)
    spans: list[tuple[int, int, bool]]
    slots: list[tuple[int, int]] = field(default_factory=list)  # (index into pieces, message index)
    answers: list[int] = field(default_factory=list)  # message index of each span's content

    def __post_init__(self) -> None:
        self.slots = [(k, piece) for k, piece in enumerate(self.pieces) if piece.__class__ is int]
        self.answers = [self.pieces[k] for k, _, _ in self.spans]


@dataclass
class EncodedBatch:
    """Flat token arrays of the kept rows of one batch (row order kept), and what happened to the others."""

    kept: Any  # int64 positions (within the batch) of kept rows
    lengths: Any  # int64 tokens per kept row
    input_ids: Any  # int32, all kept rows back to back
    labels: Any  # int32
    truncated: int = 0
    dropped: list[tuple[int, str, str]] = field(default_factory=list)  # (position, reason, detail)
    fast_rows: int = 0
    slow_rows: int = 0
    end_of_turn: dict[str, int] = field(default_factory=dict)
    template_verbatim: bool = False  # the encoder assembled fast-path rows without rendering them

    def rows(self) -> list[dict[str, list[int]]]:
        """Per kept row: input_ids, attention_mask, labels as lists."""
        out, start = [], 0
        for n in self.lengths.tolist():
            ids = self.input_ids[start:start + n].tolist()
            out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": self.labels[start:start + n].tolist()})
            start += n
        return out


class ConversationEncoder:
    """Renders, tokenizes and labels conversations for one tokenizer and one template."""

    def __init__(self, tokenizer, template_text: str, system_prompt: str | None = None,
                 max_length: int | None = None, truncation: str = "drop", control_tokens_policy: str = "error"):
        self.tokenizer = tokenizer
        self.template_text = template_text
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.truncation = truncation
        self.control_tokens_policy = control_tokens_policy
        self.markers = end_of_turn_markers(tokenizer)
        self.marker_ids = {m: tokenizer.convert_tokens_to_ids(m) for m in self.markers}
        self.eos_id = tokenizer.eos_token_id
        self.prefix = _special_prefix(tokenizer)
        self.template_kwargs = dict(tokenizer.special_tokens_map)
        self._skeletons: dict[tuple[str, ...], _Skeleton | None] = {}
        ctrl = control_tokens(tokenizer, template_text)
        self.control_re = re.compile("|".join(map(re.escape, ctrl))) if ctrl else None
        self._compiled = self._compile()
        # Only with transformers' own compiled template is the proof about what render() runs.
        self.verbatim = self._compiled is not None and template_writes_content_verbatim(template_text)
        self.backend = self._backend()

    # rendering -------------------------------------------------------------------------------

    def _compile(self):
        """transformers' own compiled template (same environment as apply_chat_template), or None."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template_text)
        except Exception:  # private API moved: every render goes through apply_chat_template
            return None
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}]
        try:
            same = compiled.render(messages=probe, add_generation_prompt=False, **self.template_kwargs) == \
                _render(self.tokenizer, self.template_text, probe, False)
        except Exception:
            same = False
        return compiled if same else None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self._compiled is None or not messages:
            return _render(self.tokenizer, self.template_text, messages, add_generation_prompt)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.template_kwargs)

    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        if roles in self._skeletons:
            return self._skeletons[roles]
        try:
            skeleton = self._build_skeleton(roles)
        except Exception:  # the template raised on sentinels: the slow path will say why
            skeleton = None
        self._skeletons[roles] = skeleton
        return skeleton

    def _build_skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        msgs = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
        full = self.render(msgs)
        matches = list(_SENTINEL_RE.finditer(full))
        if full.count("\ue000") != len(matches):
            return None  # the template changed a content: not verbatim
        pieces: list[Any] = []
        last = 0
        occurrence = {}  # piece index -> (start, end) in the skeleton
        for m in matches:
            pieces.append(full[last:m.start()])
            occurrence[len(pieces)] = (m.start(), m.end())
            pieces.append(int(m.group(1)))
            last = m.end()
        pieces.append(full[last:])
        spans = []
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            upto = self.render(msgs[: i + 1])
            prefix = None
            for gen_prompt in (True, False):
                candidate = self.render(msgs[:i], gen_prompt) if i else ""
                if full.startswith(upto) and upto.startswith(candidate):
                    prefix = candidate
                    break
            if prefix is None:
                return None
            seg_start, seg_end = len(prefix), len(upto)
            mine = [k for k, (a, b) in occurrence.items() if pieces[k] == i and a >= seg_start and b <= seg_end]
            if len(mine) != 1:
                return None
            k = mine[0]
            content_end = occurrence[k][1]
            start, end, needs_eos = _span_after_content(full, occurrence[k][0], content_end, seg_end, self.markers)
            # The closing marker must sit in the literal right after the content, not past another content.
            if end > content_end + len(pieces[k + 1]):
                return None
            spans.append((k, end - content_end, needs_eos))
        return _Skeleton(pieces, spans)

    def render_with_spans(self, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int, bool]], bool]:
        """(text, spans, fast): the template's exact rendering, assistant spans, whether the fast path held."""
        skeleton = self._skeleton(tuple(m["role"] for m in msgs))
        if skeleton is not None and all(msgs[i]["content"] for i in skeleton.answers):
            parts = skeleton.pieces.copy()
            for k, i in skeleton.slots:
                parts[k] = msgs[i]["content"]
            assembled = "".join(parts)
            # A template proved to copy contents verbatim renders exactly the assembly; any other
            # template is rendered and compared, row by row.
            text = assembled if self.verbatim else self.render(msgs)
            if assembled == text:
                offsets = list(itertools.accumulate(map(len, parts), initial=0))
                spans = [(offsets[k], offsets[k + 1] + rel, needs_eos) for k, rel, needs_eos in skeleton.spans]
                return text, spans, True
        full, spans = render_with_spans(msgs, self.tokenizer, self.template_text)
        return full, spans, False

    # tokenizing ------------------------------------------------------------------------------

    def _backend(self):
        """The Rust tokenizer behind a fast tokenizer, when it encodes exactly like the wrapper."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        probe = "<|im_start|>user\n Héllo  wörld 😀\n\tx</s>"
        try:
            same = backend.encode(probe, add_special_tokens=False).ids == \
                self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        except Exception:
            same = False
        return backend if same else None

    def _encode_texts(self, texts: list[str]):
        if self.backend is not None:
            return self.backend.encode_batch(texts, add_special_tokens=False)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("tokenization needs a fast (Rust) tokenizer for character offsets; "
                             f"{type(self.tokenizer).__name__} is not one")
        return self.tokenizer(texts, add_special_tokens=False).encodings

    def check_control_tokens(self, msgs: list[dict[str, str]]) -> str | None:
        # One search over all contents (no control token holds a NUL), then find the message.
        if self.control_re is None or not self.control_re.search("\0".join(m["content"] for m in msgs)):
            return None
        for i, m in enumerate(msgs):
            hit = self.control_re.search(m["content"])
            if hit:
                return f"message {i} ({m['role']}) contains the control token {hit.group(0)!r}"
        return None

    def encode(self, conversations: Sequence[Any], row_ids: Sequence[str] | None = None) -> EncodedBatch:
        """Render, tokenize (one batched call), label, and apply the length policy to a batch.

        Raises ValueError naming the row id for a malformed conversation, or (policy 'error') one
        whose text contains a control token.
        """
        import numpy as np

        row_ids = list(row_ids) if row_ids is not None else [str(i) for i in range(len(conversations))]
        texts, spans_per_row, positions = [], [], []
        dropped: list[tuple[int, str, str]] = []
        fast = slow = 0
        for pos, (row_id, messages) in enumerate(zip(row_ids, conversations)):
            try:
                msgs = normalize_messages(messages, self.system_prompt)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"row {row_id}: {exc}") from exc
            bad = self.check_control_tokens(msgs)
            if bad:
                if self.control_tokens_policy == "error":
                    raise ValueError(
                        f"row {row_id}: {bad}; it would be encoded as a turn boundary. Clean the data or set "
                        "control_tokens_in_content='drop'"
                    )
                dropped.append((pos, "control_token_in_content", bad))
                continue
            try:
                text, spans, was_fast = self.render_with_spans(msgs)
            except Exception as exc:
                raise ValueError(f"row {row_id}: the chat template failed: {exc}") from exc
            fast += was_fast
            slow += not was_fast
            texts.append(text)
            spans_per_row.append(spans)
            positions.append(pos)

        encodings = self._encode_texts(texts) if texts else []
        n_rows = len(encodings)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=n_rows)
        total = int(lengths.sum())
        # One row's id list at a time: holding a batch's worth of Python ints costs more than the copy.
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
        row_start = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=row_start[1:])

        # Labeled token ranges [t0, t1) and EOS insertion points, in flat coordinates.
        starts, ends, eos_at, eos_rows = [], [], [], []
        for r, (enc, spans) in enumerate(zip(encodings, spans_per_row)):
            n, base = int(lengths[r]), int(row_start[r])
            for s, e, needs_eos in spans:
                t0, t1 = _token_range(enc, s, e, n)
                if t1 > t0:
                    starts.append(base + t0)
                    ends.append(base + t1)
                if needs_eos and self.eos_id is not None:
                    eos_at.append(base + t1)
                    eos_rows.append(r)
        delta = np.zeros(total + 1, dtype=np.int32)
        np.add.at(delta, np.asarray(starts, dtype=np.int64), 1)
        np.add.at(delta, np.asarray(ends, dtype=np.int64), -1)
        labeled = np.cumsum(delta[:-1]) > 0
        labels = np.where(labeled, ids, IGNORE_INDEX).astype(np.int32)

        # Turns closed by a marker keep it (counted); turns without one get an appended, labeled EOS.
        eot_counts: Counter = Counter()
        if eos_at:
            eos_at_arr = np.asarray(eos_at, dtype=np.int64)
            ids = np.insert(ids, eos_at_arr, self.eos_id)
            labels = np.insert(labels, eos_at_arr, self.eos_id)
            per_row = np.bincount(np.asarray(eos_rows, dtype=np.int64), minlength=n_rows)
            lengths = lengths + per_row
            eot_counts[f"{self.tokenizer.eos_token} (appended)"] += len(eos_at)
            row_start = np.zeros(n_rows + 1, dtype=np.int64)
            np.cumsum(lengths, out=row_start[1:])
        for marker, mid in self.marker_ids.items():
            if mid is not None:
                eot_counts[marker] += int(np.count_nonzero(labels == mid))
        if eos_at:
            eot_counts[self.tokenizer.eos_token] -= len(eos_at)
        eot_counts = Counter({k: v for k, v in eot_counts.items() if v > 0})

        # Exactly one BOS: tokenizers that expect one get it, unless the template wrote it already.
        if self.prefix and n_rows:
            p = len(self.prefix)
            prefix_arr = np.asarray(self.prefix, dtype=np.int32)
            has = np.array([lengths[r] >= p and np.array_equal(ids[row_start[r]:row_start[r] + p], prefix_arr)
                            for r in range(n_rows)], dtype=bool)
            need = np.flatnonzero(~has)
            if len(need):
                at = np.repeat(row_start[need], p)
                ids = np.insert(ids, at, np.tile(prefix_arr, len(need)))
                labels = np.insert(labels, at, IGNORE_INDEX)
                lengths = lengths.copy()
                lengths[need] += p
                row_start = np.zeros(n_rows + 1, dtype=np.int64)
                np.cumsum(lengths, out=row_start[1:])

        # The length policy.
        keep_row = np.ones(n_rows, dtype=bool)
        truncated = 0
        if self.max_length is not None and n_rows:
            too_long = lengths > self.max_length
            if too_long.any():
                if self.truncation == "drop":
                    for r in np.flatnonzero(too_long):
                        dropped.append((positions[r], "too_long",
                                        f"{int(lengths[r])} tokens > max_length={self.max_length}"))
                    keep_row &= ~too_long
                else:
                    offset_in_row = np.arange(len(ids), dtype=np.int64) - np.repeat(row_start[:-1], lengths)
                    keep_tok = offset_in_row < self.max_length
                    ids, labels = ids[keep_tok], labels[keep_tok]
                    new_lengths = np.minimum(lengths, self.max_length)
                    row_start = np.zeros(n_rows + 1, dtype=np.int64)
                    np.cumsum(new_lengths, out=row_start[1:])
                    labeled_per_row = np.add.reduceat((labels != IGNORE_INDEX).astype(np.int64), row_start[:-1]) \
                        if len(labels) else np.zeros(n_rows, dtype=np.int64)
                    empty = too_long & (labeled_per_row == 0)
                    for r in np.flatnonzero(empty):
                        dropped.append((positions[r], "no_labels_after_truncation",
                                        f"{int(lengths[r])} tokens, truncated to {self.max_length}: no assistant token left"))
                    keep_row &= ~empty
                    truncated = int(np.count_nonzero(too_long & ~empty))
                    lengths = new_lengths
        if not keep_row.all():
            keep_tok = np.repeat(keep_row, lengths)
            ids, labels = ids[keep_tok], labels[keep_tok]
            lengths = lengths[keep_row]
        kept = np.asarray(positions, dtype=np.int64)[keep_row] if n_rows else np.zeros(0, dtype=np.int64)
        return EncodedBatch(kept=kept, lengths=lengths, input_ids=ids, labels=labels, truncated=truncated,
                            dropped=sorted(dropped), fast_rows=fast, slow_rows=slow, end_of_turn=dict(eot_counts),
                            template_verbatim=self.verbatim)


def _token_range(enc, s: int, e: int, n: int) -> tuple[int, int]:
    """[t0, t1): the tokens overlapping characters [s, e); for an empty span, t0 = t1 = the insertion
    point (the first token starting at or after s)."""
    if e > s:
        t0 = None
        for c in range(s, e):
            t0 = enc.char_to_token(c)
            if t0 is not None:
                break
        if t0 is not None:
            t1 = None
            for c in range(e - 1, s - 1, -1):
                t1 = enc.char_to_token(c)
                if t1 is not None:
                    break
            t1 += 1
            # A character split over several byte-level tokens: take them all.
            while t1 < n and enc.token_to_chars(t1)[0] < e:
                t1 += 1
            return t0, t1
    # Empty span (or no token covers it): insertion point.
    offsets = enc.offsets
    k = bisect.bisect_left([a for a, _ in offsets], s)
    return k, k


def tokenize_conversation(messages, tokenizer, cfg: TokenizationConfig | None = None) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels (-100 outside assistant turns) for one conversation.

    Not clipped to cfg.max_length: build_sft_dataset applies the drop/truncate policy.
    """
    cfg = cfg or TokenizationConfig()
    template, _ = resolve_template(tokenizer, cfg.template)
    encoder = ConversationEncoder(tokenizer, template, cfg.system_prompt, None,
                                  control_tokens_policy=cfg.control_tokens_in_content)
    batch = encoder.encode([messages])
    if not len(batch.kept):
        raise ValueError(f"conversation dropped: {batch.dropped[0][2]}")
    return batch.rows()[0]
