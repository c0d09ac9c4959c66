"""The tokenizer's special tokens as this stage uses them: end-of-turn markers, the BOS prefix, control tokens."""

from __future__ import annotations

# Markers that close an assistant turn in common templates, tried after the tokenizer's own EOS.
# Only markers that are single added/special tokens of the tokenizer count: a marker that is
# plain text would teach the model to write text, not to stop, so then an EOS is appended.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def end_of_turn_markers(tokenizer) -> list[str]:
    """Strings that close an assistant turn for this tokenizer: its EOS first, then known markers that
    are single added tokens of its vocabulary (a plain-text marker does not teach the model to stop)."""
    eos = tokenizer.eos_token
    added = set(tokenizer.get_added_vocab())
    markers = [eos] if eos else []
    markers += [m for m in END_OF_TURN_MARKERS if m != eos and m in added]
    return markers


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text when adding special tokens (usually BOS), else []."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n > 0 and with_special[n:n + len(plain)] == plain:
        return list(with_special[:n])
    return []


def control_tokens(tokenizer, template_text: str) -> list[str]:
    """Tokens that must not appear inside message text: special tokens, and added tokens the template
    writes (a message containing one would be encoded as a real turn boundary)."""
    out = set()
    for token in tokenizer.added_tokens_decoder.values():
        content = token.content
        if not content.strip():
            continue  # whitespace tokens (Gemma's "\n") are ordinary text
        if token.special or content in template_text:
            out.add(content)
    for tok in getattr(tokenizer, "all_special_tokens", []) or []:
        if tok and tok.strip():
            out.add(tok)
    return sorted(out, key=len, reverse=True)
