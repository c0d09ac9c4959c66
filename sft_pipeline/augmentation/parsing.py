"""Reading teacher replies: instruction lines, inputs, output-first (label, input) pairs."""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Lower case with whitespace runs folded: the key under which two texts count as the same."""
    return " ".join(str(text).lower().split())


_PREFIX_RE = re.compile(
    r"""^(?:
        \s*\#\d+\s*[.):]?\s*                                                 # #1  #1.
      | \s*(?:[-*\u2022>#]+\s*)                                            # bullets, quote marks, headings
      | \s*\(?\d+\s*(?:[.):\]](?!\d)|-\s)\s*                              # 1.  1)  (1)  1:  1 - (not 1.5, 3-step)
      | \s*\*{0,2}(?:new\s+)?(?:task|instruction|question|prompt)(?:\s*\#?\d+)?\s*\*{0,2}\s*[:.\-]\s*\*{0,2}  # Task: / New task 5:
    )""",
    re.IGNORECASE | re.VERBOSE,
)
QUOTES = "\"'`\u201c\u201d\u2018\u2019*"


_PREAMBLE_RE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|great|absolutely)[!,.]+\s*"
    r"|^here(?:'s| is| are)\b[^:]*?(?:task|instruction|example|one)s?\s*[:.!-]\s*",
    re.IGNORECASE,
)


def _strip_decorations(line: str) -> str:
    # Strip repeatedly: replies like '1. Task: "..."' stack several decorations.
    while True:
        stripped = _PREFIX_RE.sub("", line, count=1)
        stripped = _PREAMBLE_RE.sub("", stripped, count=1).strip().strip(QUOTES).strip()
        if stripped == line:
            return line
        line = stripped


def parse_instructions(text: str, limit: int | None = None) -> list[str]:
    """The instruction lines of a teacher reply, in order, without numbering, bullets, quotes or lead-ins.

    A line ending in ':' that is followed by more lines is a lead-in ("Here are two new tasks:") and
    is skipped; repeated lines count once. At most `limit` instructions are returned.
    """
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if line.endswith(":") and i + 1 < len(lines):
            continue
        cleaned = _strip_decorations(line)
        key = normalize(cleaned)
        if cleaned and key not in seen:
            seen.add(key)
            out.append(cleaned)
            if limit is not None and len(out) >= limit:
                break
    return out


def parse_instruction(text: str) -> str:
    """The first instruction line of a teacher reply (see `parse_instructions`), or ''."""
    found = parse_instructions(text, limit=1)
    return found[0] if found else ""


_NOINPUT_RE = re.compile(
    r"^\W*(?:<\s*no\s*input\s*>|no\s*input(?:\s+(?:is\s+)?(?:needed|required))?|none|n/?a|not applicable|nothing)\W*$",
    re.IGNORECASE,
)
_INPUT_LABEL_RE = re.compile(r"^\s*\**\s*(?:example\s+)?input\s*\**\s*:\s*\**\s*", re.IGNORECASE)


def parse_input(text: str) -> str:
    """The input from an input-first reply; '' when the teacher says the task needs none."""
    text = str(text).strip()
    if "<noinput>" in text.replace(" ", "").lower():
        return ""
    text = _INPUT_LABEL_RE.sub("", text, count=1).strip()
    # A trailing "Output:" section is the teacher running ahead; the output is asked for separately.
    text = re.split(r"\n\s*\**\s*output\s*\**\s*:", text, maxsplit=1, flags=re.IGNORECASE)[0].strip()
    if not text or _NOINPUT_RE.match(text):
        return ""
    return text


_LABEL_RE = re.compile(r"^\s*\**\s*(?:class\s+label|label|class|output)\s*\**\s*:\s*\**\s*(.*?)\s*\**\s*$", re.IGNORECASE)


def parse_output_first(text: str) -> tuple[str, str] | None:
    """(class label, input) from an output-first reply; None when no label can be found."""
    label = ""
    input_lines: list[str] = []
    in_input = False
    for line in str(text).splitlines():
        m = _LABEL_RE.match(line)
        if m and not label and not in_input:
            label = m.group(1).strip().strip(QUOTES).strip()
            continue
        if _INPUT_LABEL_RE.match(line):
            in_input = True
            rest = _INPUT_LABEL_RE.sub("", line, count=1).strip()
            if rest:
                input_lines.append(rest)
            continue
        if in_input:
            input_lines.append(line)
    if not label:
        return None
    input_text = "\n".join(input_lines).strip()
    if _NOINPUT_RE.match(input_text) or "<noinput>" in input_text.replace(" ", "").lower():
        input_text = ""
    return label, input_text


__all__ = ["QUOTES", "normalize", "parse_instructions", "parse_instruction", "parse_input", "parse_output_first"]
