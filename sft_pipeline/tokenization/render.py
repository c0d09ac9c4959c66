"""Rendering one conversation with a chat template, and locating its assistant spans (the reference path)."""

from __future__ import annotations

from typing import Any, Sequence

from sft_pipeline.tokenization.tokens import end_of_turn_markers


def normalize_messages(messages: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Plain list of {role, content} dicts (from lists, numpy arrays or Arrow structs), system prompt added."""
    if messages is None or isinstance(messages, (str, bytes, dict)):
        raise ValueError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        try:
            role, content = m["role"], m["content"]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"message {i} is not a {{role, content}} mapping: {m!r:.200}") from None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"bad message {i} {{role={role!r}, content={type(content).__name__}}}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("conversation has no assistant turn to train on")
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _render(tokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not messages:
        return ""  # apply_chat_template refuses an empty conversation; it renders to nothing
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _find_marker(text: str, start: int, stop: int, markers: Sequence[str]) -> tuple[int, str] | None:
    found = [(text.find(m, start, stop), m) for m in markers]
    found = [(j, m) for j, m in found if j >= 0]
    return min(found) if found else None


def _span_after_content(full: str, content_start: int | None, content_end: int, seg_end: int,
                        markers: Sequence[str]) -> tuple[int, int, bool]:
    """(start, end, needs_eos): content through the first end-of-turn marker of the turn's segment;
    with no marker, content through the segment's last non-blank character, and an EOS appended."""
    hit = _find_marker(full, content_end, seg_end, markers)
    if hit is not None:
        j, marker = hit
        return (j if content_start is None else content_start), j + len(marker), False
    end = content_end + len(full[content_end:seg_end].rstrip())
    return (end if content_start is None else content_start), end, True


def render_with_spans(
    messages: list[dict[str, str]], tokenizer, template: str
) -> tuple[str, list[tuple[int, int, bool]]]:
    """Reference (slow) path: rendered text and, per assistant turn, (start, end, needs_eos) spans.

    A span covers the content and the marker that closes the turn (EOS or end-of-turn token).
    needs_eos is True when the template closes the turn with no marker token, so EOS is appended.
    """
    full = _render(tokenizer, template, messages, False)
    markers = end_of_turn_markers(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, template, messages[: i + 1], False)
        prefix = None
        for gen_prompt in (True, False):
            candidate = _render(tokenizer, template, messages[:i], gen_prompt)
            if full.startswith(upto) and upto.startswith(candidate):
                prefix = candidate
                break
        if prefix is None:
            raise ValueError(
                "chat template is not prefix-stable (rendering the first turns is not a prefix of the "
                "whole conversation), so assistant turns cannot be located; use another template"
            )
        seg_start, seg_end = len(prefix), len(upto)
        seg = full[seg_start:seg_end]
        content = message["content"]
        pos = seg.find(content) if content else -1
        if pos < 0 and content.strip():
            content = content.strip()  # templates that trim content
            pos = seg.find(content)
        if pos >= 0:
            spans.append(_span_after_content(full, seg_start + pos, seg_start + pos + len(content), seg_end, markers))
        elif content.strip():  # the template rewrote the content: train on the whole turn
            start = seg_start + len(seg) - len(seg.lstrip())
            span = _span_after_content(full, start, start, seg_end, markers)
            if span[2]:
                span = (start, seg_start + len(seg.rstrip()), True)
            spans.append(span)
        else:  # an empty answer: only the closing marker / EOS is trained
            hit = _find_marker(full, seg_start, seg_end, markers)
            if hit is not None:
                spans.append((hit[0], hit[0] + len(hit[1]), False))
            else:
                end = seg_start + len(seg.rstrip())
                spans.append((end, end, True))
    return full, spans
