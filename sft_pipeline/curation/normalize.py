"""Text normalization: NFKC, invisible and control characters, HTML remnants, whitespace (code fences kept)."""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Callable

_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
# Control characters other than tab and newline carry no meaning in instruction text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_CODE_FENCE = re.compile(r"(```.*?```)", re.DOTALL)
# Markup left over from scraped HTML; removed outside code fences only, where a tag may be code.
# Block tags become line breaks, inline tags vanish, comments and script/style blocks go entirely.
_HTML_DROP = re.compile(r"<!--.*?-->|<(script|style)\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BLOCK_TAG = re.compile(
    r"</?(?:p|br|hr|div|li|ul|ol|h[1-6]|table|thead|tbody|tr|blockquote|pre|section|article|header|footer)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
_HTML_INLINE_TAG = re.compile(
    r"</?(?:span|a|b|i|em|strong|u|s|font|td|th|sup|sub|small|big|mark|abbr|code|tt|img|html|body|head|title|meta|link)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
# Runs of spaces after a non-space: collapsed. Leading indentation is left alone.
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")


def _outside_code_fences(text: str, transform: Callable[[str], str]) -> str:
    if "```" not in text:
        return transform(text)
    parts = _CODE_FENCE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code fences
        parts[i] = transform(parts[i])
    return "".join(parts)


def _strip_markup(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _HTML_DROP.sub("", text)
    return html.unescape(_HTML_INLINE_TAG.sub("", _HTML_BLOCK_TAG.sub("\n", text)))


def normalize_text(text: str, strip_html: bool = True) -> str:
    """NFKC, no zero-width or control characters, unix newlines, single inner spaces outside code,
    no trailing spaces, at most one blank line. Leading indentation is kept: it matters in code.
    """
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _ZERO_WIDTH.sub("", text))
    if strip_html:
        text = _outside_code_fences(text, _strip_markup)
    text = _outside_code_fences(text, lambda part: _INNER_SPACES.sub(" ", part))
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()
