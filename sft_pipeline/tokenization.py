"""Render conversations with a chat template, tokenize them, mask non-assistant tokens, split, write Parquet.

Labels are -100 everywhere except the content of every assistant turn and the end-of-turn/EOS
token that closes it, so the loss teaches the model to answer and to stop.

How assistant spans are found (both paths give identical results; tests compare them):

- **Fast path.** Once per template and role sequence (e.g. system/user/assistant), the template is
  rendered on a *skeleton* conversation whose contents are unique sentinels. That gives the
  template's literal pieces between contents, where every assistant turn's content sits, and
  which end-of-turn marker closes it (prefix renders of the skeleton define each turn's
  segment). A real conversation is then assembled by concatenation, and its spans are known
  from the content lengths. Every conversation is *also* rendered with the real template and
  compared with the assembly: a template whose output depends on the content (trimming,
  branching) fails the comparison and that conversation takes the slow path. Nothing is
  assumed that is not verified.
- **Slow path** (reference): the conversation is rendered prefix by prefix (works with any
  prefix-stable template, including ones without `{% generation %}` markers, like SmolLM2's).

All rendered texts of a batch go through ONE batched fast-tokenizer call (`encode_batch`, no
special tokens: the template writes them), character spans map to tokens with
`char_to_token`, and the rest (EOS/BOS insertion, masking, truncation, splitting, Parquet
columns) is vectorized with numpy over the flat token array of the batch.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from sft_pipeline.hashing import TableHasher, combine_digests, parquet_digest  # noqa: F401 (re-exported)

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")
PACKED_SPLITS = ("train", "validation")
INFO_FILE = "sft_dataset_info.json"
DROPPED_FILE = "dropped.parquet"
TEMPLATES_DIR = Path(__file__).parent / "templates"
# Bump when the output format or the labeling rule changes, so old fingerprints stop matching.
FORMAT_VERSION = "2"
# Markers that close an assistant turn in common templates, tried after the tokenizer's own EOS.
# Only markers that are single added/special tokens of the tokenizer count: a marker that is
# plain text would teach the model to write text, not to stop, so then an EOS is appended.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
# How split files are written: zstd without dictionary pages (token ids have too many distinct values
# for dictionaries to pay). Measured on 16k tokenized rows: a third of the default (snappy +
# dictionary) size, faster to write and to read.
PARQUET_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": False}
# Config fields that change how fast the stage runs, not what it writes: not part of the fingerprint.
_NON_OUTPUT_FIELDS = ("num_workers", "batch_size")


@dataclass
class TokenizationConfig:
    """How conversations become training sequences."""

    # Each field's help text lives in metadata["help"]: the Dagster config built from this class shows it.
    max_length: int = field(default=1024, metadata={
        "help": "Longest sequence in tokens; longer ones are dropped or truncated (see truncation)."})
    truncation: str = field(default="drop", metadata={
        "help": "'drop': discard rows longer than max_length; 'truncate': cut them (dropped if no label is left)."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of rows (by id hash) held out for validation loss / early stopping."})
    test_fraction: float = field(default=0.1, metadata={
        "help": "Share of rows (by id hash) held out for the final task evaluation."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn prepended to conversations that have none; None leaves them as they are."})
    template: str = field(default="tokenizer", metadata={
        "help": "'tokenizer' (its own chat template), a shipped name ('chatml', 'alpaca', 'llama2', 'zephyr') "
                "or a path to a .jinja file."})
    control_tokens_in_content: str = field(default="error", metadata={
        "help": "A message whose text contains a control token (e.g. '<|im_end|>') would inject a fake turn "
                "boundary: 'error' stops with the row ids, 'drop' drops those rows and reports them."})
    num_workers: int = field(default=1, metadata={
        "help": "Processes that render and tokenize in parallel (1: in this process; 0: one per CPU core)."})
    batch_size: int = field(default=16384, metadata={
        "help": "Conversations per batched tokenizer call. Does not change the output; bounds memory: a batch "
                "holds about 100 bytes per token in the tokenizer's encodings (16384 conversations of 300 "
                "tokens: ~0.5 GB). Larger batches tokenize faster (4096 was 7 % slower in bench/tokenization.py)."})
    packing: bool = field(default=False, metadata={
        "help": "Also write train/validation packed into fixed-length sequences ({split}.packed.parquet) with "
                "position_ids restarting per example, for GPU training."})
    pack_length: int = field(default=0, metadata={
        "help": "Length of a packed sequence in tokens; 0 means max_length. Also the length the packing-"
                "efficiency estimate uses."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the bad value."""
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if self.truncation not in ("drop", "truncate"):
            raise ValueError(f"truncation must be 'drop' or 'truncate', got {self.truncation!r}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "validation_fraction + test_fraction must be < 1 so rows are left for training, got "
                f"{self.validation_fraction!r} + {self.test_fraction!r}"
            )
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {self.system_prompt!r}")
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError(f"template must be 'tokenizer', a template name or a .jinja path, got {self.template!r}")
        if self.template != "tokenizer" and not self.template.endswith(".jinja"):
            if not (TEMPLATES_DIR / f"{self.template}.jinja").is_file():
                known = ["tokenizer"] + shipped_templates()
                raise ValueError(f"template must be one of {known} or a .jinja path, got {self.template!r}")
        elif self.template.endswith(".jinja") and not Path(self.template).expanduser().is_file():
            raise ValueError(f"template file does not exist: {self.template!r}")
        if self.control_tokens_in_content not in ("error", "drop"):
            raise ValueError(f"control_tokens_in_content must be 'error' or 'drop', got {self.control_tokens_in_content!r}")
        for name, low in (("num_workers", 0), ("batch_size", 1), ("pack_length", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.pack_length == 1:
            raise ValueError(f"pack_length must be 0 (= max_length) or >= 2, got {self.pack_length!r}")
        if not isinstance(self.packing, bool):
            raise ValueError(f"packing must be true or false, got {self.packing!r}")

    @property
    def effective_pack_length(self) -> int:
        return self.pack_length or self.max_length

    def output_dict(self) -> dict[str, Any]:
        """The fields that decide what is written (what the fingerprint covers)."""
        return {k: v for k, v in asdict(self).items() if k not in _NON_OUTPUT_FIELDS}


@dataclass
class SftDatasetInfo:
    """What build_sft_dataset wrote and what it holds."""

    path: str
    splits: dict[str, int]
    files: dict[str, str]
    num_tokens: int
    """Tokens in all kept rows (all splits)."""
    trainable_tokens: int
    """Tokens with a label (assistant content + end of turn), all splits."""
    truncated: int
    dropped: int
    """Rows left out for any reason (see dropped_reasons and dropped.parquet)."""
    max_length: int
    template_name: str
    length_histogram: dict[str, int] = field(default_factory=dict)
    truncation: str = "drop"
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    rows_in: int = 0
    fingerprint: str = ""
    content_hash: str = ""
    """sha256 over the rows of the written Parquet files, hashed while writing (independent of batch and
    row-group layout; `parquet_digest` recomputes a file's part): the asset's data version."""
    reused: bool = False
    """True when a dataset with the same fingerprint already existed and nothing was tokenized."""
    trainable_token_share: float = 0.0
    packing_efficiency: float = 0.0
    """Share of real tokens if the train split were packed into pack_length sequences (best-fit decreasing)."""
    pack_length: int = 0
    packed_files: dict[str, str] = field(default_factory=dict)
    packed_sequences: dict[str, int] = field(default_factory=dict)
    end_of_turn_tokens: dict[str, int] = field(default_factory=dict)
    """Which token closed the assistant turns, and how often (the EOS, or an appended EOS)."""
    eos_token: str | None = None
    pad_token: str | None = None
    bos_prefix: list[int] = field(default_factory=list)
    """Ids the tokenizer expects first (its BOS); [] when it adds none (the template writes its own)."""
    system_prompt: str | None = None
    fast_path_rows: int = 0
    template_verbatim: bool = False
    """The template was proved (from its syntax tree) to copy contents verbatim, so fast-path rows
    were assembled from the skeleton without rendering each row a second time to compare."""
    slow_path_rows: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SftDatasetInfo":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def shipped_templates() -> list[str]:
    """Names of the templates in sft_pipeline/templates/."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


# --- splits ---------------------------------------------------------------------------------------


def split_position(row_id: str) -> float:
    """A number in [0, 1) from sha256 of the id: the row's fixed place on the split line."""
    return int(hashlib.sha256(str(row_id).encode("utf-8")).hexdigest()[:16], 16) / 2**64


def assign_split(row_id: str, validation_fraction: float, test_fraction: float) -> str:
    """"train", "validation" or "test" for a row, from its id alone (adding rows never moves one)."""
    x = split_position(row_id)
    if x < test_fraction:
        return "test"
    if x < test_fraction + validation_fraction:
        return "validation"
    return "train"


# --- templates ------------------------------------------------------------------------------------


def resolve_template(tokenizer, template: str = "tokenizer") -> tuple[str, str]:
    """(Jinja text, name) for `template`: "tokenizer", a shipped template name, or a .jinja path."""
    if template == "tokenizer":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one renders chats
            text = text.get("default")
        if not text:
            raise ValueError(
                "the tokenizer has no chat template; set template to 'chatml' (or another shipped "
                "name or a .jinja path)"
            )
        return text, "tokenizer"
    if template.endswith(".jinja"):
        path = Path(template).expanduser()
        if not path.is_file():
            raise ValueError(f"template file does not exist: {template!r}")
        return path.read_text(encoding="utf-8"), f"file:{path.name}"
    path = TEMPLATES_DIR / f"{template}.jinja"
    if not path.is_file():
        raise ValueError(f"unknown template {template!r}; shipped templates: {shipped_templates()}")
    return path.read_text(encoding="utf-8"), template


# --- one conversation -----------------------------------------------------------------------------


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


def end_of_turn_markers(tokenizer) -> list[str]:
    """Strings that close an assistant turn for this tokenizer: its EOS first, then known markers that
    are single added tokens of its vocabulary (a plain-text marker does not teach the model to stop)."""
    eos = tokenizer.eos_token
    added = set(tokenizer.get_added_vocab())
    markers = [eos] if eos else []
    markers += [m for m in END_OF_TURN_MARKERS if m != eos and m in added]
    return markers


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


# --- proving a template copies contents verbatim ----------------------------------------------------

# What a template may read from a message: its fields, nothing else (no `.items()`, `.get`, ...).
_MESSAGE_KEYS = ("role", "content")
# Attributes of Jinja's loop object that depend on the position only.
_LOOP_ATTRIBUTES = ("index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0")


def template_writes_content_verbatim(template_text: str) -> bool:
    """True when the template's output can depend on a message's content only by writing it verbatim.

    Proved from the template's syntax tree (parsed by transformers' own Jinja environment): every
    read of a message's content goes straight to the output, alone or joined with `+` / `~`, in a
    loop, an `if` or a `{% generation %}` block; messages and the message list are used only for
    their roles, their length, indexing, slicing and truthiness. Then the rendered text of any
    conversation is the skeleton of its role sequence with the contents pasted in, and rows need
    no second render to be verified. Conservative: anything else (a filter, test, condition,
    `set`, macro or block that sees a content, a message passed whole anywhere) gives False, and
    every row is then verified by rendering it.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template_text).environment
        tree = environment.parse(template_text)
    except Exception:  # private API moved, or the template does not parse: verify by rendering
        return False
    if environment.autoescape:
        return False
    return _VerbatimProof(tree).holds()


class _VerbatimProof:
    """The syntax-tree walk behind template_writes_content_verbatim."""

    def __init__(self, tree):
        from jinja2 import nodes

        self.nodes = nodes
        self.tree = tree
        self.parent: dict[int, tuple[Any, str]] = {}  # id(node) -> (parent node, field name)
        self.all: list[Any] = []
        stack = [tree]
        while stack:
            node = stack.pop()
            self.all.append(node)
            for name, value in node.iter_fields():
                for child in (value if isinstance(value, list) else [value]):
                    if isinstance(child, nodes.Node):
                        self.parent[id(child)] = (node, name)
                        stack.append(child)
        self.list_names = {"messages"}
        self.message_names: set[str] = set()

    def kind(self, node) -> str | None:
        """'list' (of messages), 'message', or None (anything else) for an expression."""
        n = self.nodes
        if isinstance(node, n.Name) and node.ctx == "load":
            if node.name in self.list_names:
                return "list"
            if node.name in self.message_names:
                return "message"
        elif isinstance(node, n.Getitem) and self.kind(node.node) == "list":
            return "list" if isinstance(node.arg, n.Slice) else "message"
        elif isinstance(node, n.Filter) and node.node is not None and self.kind(node.node) == "list":
            return "message" if node.name in ("first", "last") else None
        elif isinstance(node, n.Getattr) and isinstance(node.node, n.Name) and node.node.name == "loop" \
                and node.attr in ("previtem", "nextitem"):
            return "message"
        return None

    def bindings(self) -> dict[str, list[Any]]:
        """Every place a name is bound: ("for", iterable) or ("set", value) when it is one plain name,
        None when the value cannot be classified (unpacking, {% set %} blocks, with, macro arguments)."""
        n = self.nodes
        out: dict[str, list[Any]] = {}

        def add(target, source) -> None:
            plain = isinstance(target, n.Name)
            for name in ([target] if plain else list(target.find_all(n.Name))):
                out.setdefault(name.name, []).append(source if plain else None)

        for node in self.all:
            if isinstance(node, n.For):
                add(node.target, ("for", node.iter))
            elif isinstance(node, n.Assign):
                add(node.target, ("set", node.node))
            elif isinstance(node, n.AssignBlock):
                add(node.target, None)
            elif isinstance(node, n.With):
                for target in node.targets:
                    add(target, None)
            elif isinstance(node, (n.Macro, n.CallBlock)):
                for arg in node.args:
                    add(arg, None)
                if isinstance(node, n.Macro):
                    out.setdefault(node.name, []).append(None)
        return out

    def bound_kind(self, source) -> str | None:
        if source is None:
            return None
        how, value = source
        if how == "for":
            return "message" if self.kind(value) == "list" else None
        return self.kind(value)

    def holds(self) -> bool:
        n = self.nodes
        if any(isinstance(x, (n.Include, n.Import, n.FromImport, n.Extends)) or
               (isinstance(x, n.For) and x.recursive) for x in self.all):
            return False
        bindings = self.bindings()
        if "loop" in bindings:
            return False  # `loop` must stay Jinja's loop object (see loop_use_is_allowed)
        # Names bound to messages (loop targets, `set` aliases), to a fixed point.
        changed = True
        while changed:
            changed = False
            for name, sources in bindings.items():
                for source in sources:
                    bound = self.bound_kind(source)
                    names = self.list_names if bound == "list" else self.message_names if bound else None
                    if names is not None and name not in names:
                        names.add(name)
                        changed = True
        # A tracked name must hold that kind wherever it is bound: `set x = messages` then
        # `set x = x[0]` would make x['content'] look like a message field.
        if self.list_names & self.message_names:
            return False
        for name in self.list_names | self.message_names:
            want = "list" if name in self.list_names else "message"
            if any(self.bound_kind(source) != want for source in bindings.get(name, [])):
                return False
        loops = [x for x in self.all if isinstance(x, n.Name) and x.name == "loop"]
        if not all(self.loop_use_is_allowed(x) for x in loops):
            return False
        return all(self.use_is_allowed(node) for node in self.all if self.kind(node) is not None)

    def loop_use_is_allowed(self, node) -> bool:
        """`loop` only as loop.index, loop.first, ... (structure) or loop.previtem / loop.nextitem
        (checked as messages); passing the loop object on or indexing it lets contents out unchecked."""
        parent, field_name = self.parent.get(id(node), (None, ""))
        return isinstance(parent, self.nodes.Getattr) and field_name == "node" and \
            parent.attr in _LOOP_ATTRIBUTES + ("previtem", "nextitem")

    def use_is_allowed(self, node) -> bool:
        n = self.nodes
        parent, field_name = self.parent.get(id(node), (None, ""))
        if self.in_boolean_context(node):
            return True
        if isinstance(parent, n.Assign) and field_name == "node":
            return isinstance(parent.target, n.Name)  # followed as an alias; `ns.x = message` is not
        if self.kind(node) == "list":
            if isinstance(parent, n.For) and field_name == "iter":
                return True
            if isinstance(parent, n.Getitem) and field_name == "node":
                return True
            return isinstance(parent, n.Filter) and field_name == "node" and \
                parent.name in ("length", "count", "first", "last")
        # A message: only its fields may be read, by constant name.
        if isinstance(parent, n.Getitem) and field_name == "node" and isinstance(parent.arg, n.Const):
            key = parent.arg.value
        elif isinstance(parent, n.Getattr) and field_name == "node":
            key = parent.attr
        else:
            return False
        if key not in _MESSAGE_KEYS:
            return False
        return key != "content" or self.written_verbatim(parent)

    def in_boolean_context(self, node) -> bool:
        """The node's value is only ever tested for truth (if/elif, a loop filter, `x if node else y`)."""
        n = self.nodes
        while True:
            parent, field_name = self.parent.get(id(node), (None, ""))
            if isinstance(parent, (n.If, n.CondExpr, n.For)) and field_name == "test":
                return True
            if isinstance(parent, n.Not):
                return True  # `not x` is a bool whatever x is
            if not isinstance(parent, (n.And, n.Or)):
                return False
            node = parent  # `a and b` is a or b itself: it must land in a test too

    def written_verbatim(self, content) -> bool:
        """The content expression is written to the output, at most joined to other strings by + or ~,
        outside any block that could capture or transform the output."""
        n = self.nodes
        node = content
        while True:
            parent, field_name = self.parent.get(id(node), (None, ""))
            if isinstance(parent, (n.Add, n.Concat)):
                node = parent
                continue
            if not (isinstance(parent, n.Output) and field_name == "nodes"):
                return False
            break
        node = parent
        while True:
            parent, field_name = self.parent.get(id(node), (None, ""))
            if parent is None:
                return node is self.tree
            if isinstance(parent, n.For) and field_name in ("body", "else_"):
                pass
            elif isinstance(parent, n.If) and field_name in ("body", "elif_", "else_"):
                pass
            elif isinstance(parent, n.CallBlock) and field_name == "body" and self.is_generation_block(parent):
                pass
            elif not isinstance(parent, n.Template):
                return False
            node = parent

    def is_generation_block(self, block) -> bool:
        """transformers' `{% generation %}` marker: it writes its body unchanged."""
        n = self.nodes
        call = block.call
        return isinstance(call, n.Call) and isinstance(call.node, n.ExtensionAttribute) \
            and call.node.name == "_generation_support" and not call.args and not call.kwargs


# --- the encoder ----------------------------------------------------------------------------------

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


# --- workers --------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _worker_encoder(model_dir: str, template: str, system_prompt: str | None, max_length: int,
                    truncation: str, policy: str) -> ConversationEncoder:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text, _ = resolve_template(tokenizer, template)
    return ConversationEncoder(tokenizer, text, system_prompt, max_length, truncation, policy)


def _encode_chunk(args) -> EncodedBatch:
    key, row_ids, conversations = args
    return _worker_encoder(*key).encode(conversations, row_ids)


def _worker_init() -> None:
    # Several processes: each tokenizes on one thread, or they fight over the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _set_heap_trim_threshold(HEAP_TRIM_THRESHOLD)  # a worker process only tokenizes: keep its heap


# glibc hands freed heap back to the OS once more than M_TRIM_THRESHOLD bytes are free at its top.
# Each batch frees its encodings (~100 MB for 4096 conversations), so the next batch faults the
# same memory back in, page by page: measured on this project's 2-core VM, 10-20 % of the encode
# time at batch_size 4096 in bench/tokenization.py. While the stage runs the threshold is
# raised; afterwards it is set back and the freed heap is returned at once. (Setting it also ends
# glibc's dynamic mmap threshold for the process: large blocks keep using mmap from 128 KiB up.)
HEAP_TRIM_THRESHOLD = 1 << 30
_GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt parameter number, from glibc's malloc.h


@lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _set_heap_trim_threshold(nbytes: int) -> bool:
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_TRIM_THRESHOLD, nbytes))


@contextlib.contextmanager
def bulk_allocation():
    """For the batch loop: freed heap stays in the process for the next batch (glibc; elsewhere
    nothing changes), and the objects alive when the loop starts (every conversation) are frozen
    out of garbage collection, so the collections the loop's millions of allocations trigger do
    not walk them again each time (about 1 % of the stage at 100k rows). Cycles made inside the
    loop (slow-path Jinja renders) are still collected. Both are undone on exit."""
    import gc

    raised = _set_heap_trim_threshold(HEAP_TRIM_THRESHOLD)
    froze = gc.get_freeze_count() == 0  # someone else's freeze is left alone
    if froze:
        gc.freeze()
    try:
        yield
    finally:
        if froze:
            gc.unfreeze()
        if raised:
            _set_heap_trim_threshold(_GLIBC_DEFAULT_TRIM_THRESHOLD)
            _glibc().malloc_trim(0)


# --- the dataset ----------------------------------------------------------------------------------


def _histogram(lengths: Iterable[int], max_length: int) -> dict[str, int]:
    import numpy as np

    edges, edge = [], 32
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    edges.append(max_length)
    lows = [1] + [e + 1 for e in edges[:-1]]
    values = np.fromiter(lengths, dtype=np.int64)
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)
    return {f"{lo}-{hi}": int(c) for lo, hi, c in zip(lows, edges, counts[: len(edges)])}


def _arrow_schema(with_messages: bool):
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    cols = [
        ("id", pa.string()), ("input_ids", ints), ("attention_mask", ints), ("labels", ints), ("length", pa.int64()),
    ]
    if with_messages:
        cols.append(("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
    return pa.schema(cols)


def _packed_schema():
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.schema([
        ("id", pa.string()), ("input_ids", ints), ("attention_mask", ints), ("labels", ints),
        ("position_ids", ints), ("length", pa.int64()), ("example_ids", pa.list_(pa.string())),
        ("example_lengths", ints),
    ])


def _list_array(lengths, values):
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a batch holds more than 2**31 tokens; lower batch_size")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


class _SplitWriter:
    """Appends batches of rows to one split's Parquet file, hashing them on the way (no re-read)."""

    def __init__(self, path: Path, with_messages: bool):
        import pyarrow.parquet as pq

        self.schema = _arrow_schema(with_messages)
        self.writer = pq.ParquetWriter(path, self.schema, **PARQUET_WRITE_OPTIONS)
        self.hasher = TableHasher()
        self.lengths: list[Any] = []
        self.rows = 0

    def write(self, ids: list[str], lengths, input_ids, labels, messages=None) -> None:
        import numpy as np
        import pyarrow as pa

        cols = [
            pa.array(ids, type=pa.string()),
            _list_array(lengths, input_ids),
            _list_array(lengths, np.ones(len(input_ids), dtype=np.int32)),
            _list_array(lengths, labels),
            pa.array(lengths, type=pa.int64()),
        ]
        if messages is not None:
            cols.append(pa.array(messages, type=self.schema.field("messages").type))
        table = pa.Table.from_arrays(cols, schema=self.schema)
        self.writer.write_table(table)
        self.hasher.update(table)
        self.lengths.append(lengths)
        self.rows += len(ids)

    def close(self) -> None:
        self.writer.close()


def pack_bins(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Best-fit decreasing: row indices grouped into bins of at most pack_length tokens (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    caps: list[int] = []  # sorted distinct remaining capacities that have an open bin
    open_bins: dict[int, list[int]] = {}
    for i in order:
        n = int(lengths[i])
        if n > pack_length:
            raise ValueError(f"row {i} has {n} tokens, more than pack_length={pack_length}")
        k = bisect.bisect_left(caps, n)
        if k < len(caps):
            cap = caps[k]
            b = open_bins[cap].pop()
            if not open_bins[cap]:
                caps.pop(k)
        else:
            cap, b = pack_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = cap - n
        if left >= 2:  # no example is shorter than 2 tokens
            if not open_bins.get(left):
                bisect.insort(caps, left)
                open_bins[left] = []
            open_bins[left].append(b)
    return bins


def packing_efficiency(lengths: Sequence[int], pack_length: int) -> float:
    """Share of real tokens when `lengths` are packed into pack_length sequences (1.0 = no padding)."""
    if not len(lengths):
        return 0.0
    bins = pack_bins(lengths, pack_length)
    return float(sum(int(x) for x in lengths)) / (len(bins) * pack_length)


def write_packed_split(src: str | Path, dst: str | Path, pack_length: int, pad_token_id: int,
                       hasher: TableHasher | None = None) -> int:
    """Pack an unpacked split file into fixed-length sequences; returns the number of sequences.
    `hasher`, when given, is fed the rows written (so the file need not be read back to hash it).

    Each sequence holds whole examples back to back and ends with padding (label -100, attention 0).
    position_ids restart at 0 for every example (and for the padding). To keep examples from
    attending to each other, train with `packed_attention_mask(example_lengths, length)` (a 4D
    block-diagonal causal mask; works with eager and sdpa) or with flash-attention-2, which
    reads the example boundaries from position_ids. The first token of every example is
    unlabeled, so no example learns from the one before it.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src, columns=["id", "input_ids", "labels", "length"])
    row_ids = table.column("id").to_pylist()
    lengths = table.column("length").to_numpy().astype(np.int64)
    ids = table.column("input_ids").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.int32)
    labels = table.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.int32)
    if not len(lengths):
        empty = _packed_schema().empty_table()
        pq.write_table(empty, dst, **PARQUET_WRITE_OPTIONS)
        if hasher is not None:
            hasher.update(empty)
        return 0
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    bins = pack_bins(lengths, pack_length)
    order = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(lengths))
    per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    ordered_len = lengths[order]
    # Gather the examples in bin order.
    gather = np.repeat(starts[:-1][order] - np.concatenate(([0], np.cumsum(ordered_len)[:-1])), ordered_len) \
        + np.arange(int(ordered_len.sum()), dtype=np.int64)
    g_ids, g_labels = ids[gather], labels[gather].copy()
    g_pos = np.arange(len(gather), dtype=np.int64) - np.repeat(np.concatenate(([0], np.cumsum(ordered_len)[:-1])), ordered_len)
    first = np.concatenate(([0], np.cumsum(ordered_len)[:-1]))
    g_labels[first] = IGNORE_INDEX
    # Lay the bins out at fixed length, with padding after each bin's examples.
    bin_real = np.add.reduceat(ordered_len, np.concatenate(([0], np.cumsum(per_bin)[:-1]))) if len(bins) else per_bin
    n_bins = len(bins)
    out_ids = np.full(n_bins * pack_length, pad_token_id, dtype=np.int32)
    out_labels = np.full(n_bins * pack_length, IGNORE_INDEX, dtype=np.int32)
    out_mask = np.zeros(n_bins * pack_length, dtype=np.int32)
    out_pos = np.tile(np.arange(pack_length, dtype=np.int32), n_bins)  # padding restarts at 0 too
    bin_first = np.concatenate(([0], np.cumsum(bin_real)[:-1]))
    dest = np.repeat(np.arange(n_bins, dtype=np.int64) * pack_length - bin_first, bin_real) + np.arange(len(gather))
    out_ids[dest], out_labels[dest], out_mask[dest] = g_ids, g_labels, 1
    pad_start = np.arange(n_bins, dtype=np.int64) * pack_length + bin_real
    pad_len = pack_length - bin_real
    pad_idx = np.repeat(pad_start - np.concatenate(([0], np.cumsum(pad_len)[:-1])), pad_len) + np.arange(int(pad_len.sum()))
    out_pos[dest] = g_pos
    out_pos[pad_idx] = np.arange(len(pad_idx)) - np.repeat(np.concatenate(([0], np.cumsum(pad_len)[:-1])), pad_len)
    fixed = np.full(n_bins, pack_length, dtype=np.int64)
    ex_ids = [[row_ids[i] for i in b] for b in bins]
    pack_names = [f"pack-{hashlib.sha256(chr(0).join(e).encode()).hexdigest()[:16]}" for e in ex_ids]
    schema = _packed_schema()
    cols = [
        pa.array(pack_names, type=pa.string()),
        _list_array(fixed, out_ids), _list_array(fixed, out_mask), _list_array(fixed, out_labels),
        _list_array(fixed, out_pos), pa.array(fixed, type=pa.int64()),
        pa.array(ex_ids, type=pa.list_(pa.string())),
        _list_array(per_bin, ordered_len.astype(np.int32)),
    ]
    table = pa.Table.from_arrays(cols, schema=schema)
    pq.write_table(table, dst, **PARQUET_WRITE_OPTIONS)
    if hasher is not None:
        hasher.update(table)
    return n_bins


def packed_attention_mask(example_lengths: Sequence[int], length: int, dtype=None):
    """A (1, 1, length, length) additive attention mask for one packed sequence: each token sees the
    earlier tokens of its own example only (padding sees only itself). 0 = attend, dtype min = blocked."""
    import torch

    dtype = dtype or torch.float32
    segment = torch.full((length,), -1, dtype=torch.long)
    start = 0
    for k, n in enumerate(int(x) for x in example_lengths):
        segment[start:start + n] = k
        start += n
    same = segment[:, None] == segment[None, :]
    same |= torch.eye(length, dtype=torch.bool)  # padding tokens attend to themselves
    allowed = same & torch.tril(torch.ones(length, length, dtype=torch.bool))
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def build_sft_dataset(
    rows, model_dir: str | Path, out_dir: str | Path, cfg: TokenizationConfig | None = None,
    fingerprint_value: str = "",
) -> SftDatasetInfo:
    """Tokenize canonical rows with the tokenizer in `model_dir`, write train/validation/test Parquet.

    rows: DataFrame with `id` and `messages`. Writes `{split}.parquet` (id, input_ids, attention_mask,
    labels, length; test also keeps messages), `dropped.parquet` (id, reason, detail), with
    `packing` also `{train,validation}.packed.parquet`, and sft_dataset_info.json into `out_dir`,
    replacing what was there (built beside it and renamed into place). Raises ValueError for a
    malformed row (naming its id) or when no row would land in train.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    began = time.perf_counter()
    cfg = cfg or TokenizationConfig()
    cfg.validate()
    if len(rows) == 0:
        raise ValueError("build_sft_dataset got no rows")
    for column in ("id", "messages"):
        if column not in rows:
            raise ValueError(f"build_sft_dataset: rows lack the column {column!r} (have {list(rows.columns)})")
    model_dir = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template, template_name = resolve_template(tokenizer, cfg.template)
    key = (model_dir, cfg.template, cfg.system_prompt, cfg.max_length, cfg.truncation, cfg.control_tokens_in_content)

    all_ids = [str(x) for x in rows["id"]]
    all_messages = list(rows["messages"])
    # Same id = same conversation (ids are content hashes): keep the first, report the others.
    seen: set[str] = set()
    unique, dropped_rows = [], []
    for i, row_id in enumerate(all_ids):
        if row_id in seen:
            dropped_rows.append({"id": row_id, "reason": "duplicate_id", "detail": f"row {i} repeats an earlier id"})
        else:
            seen.add(row_id)
            unique.append(i)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writers = {s: _SplitWriter(tmp / f"{s}.parquet", s == "test") for s in SPLITS}
        split_code = {"train": 0, "validation": 1, "test": 2}
        chunks = [(key, [all_ids[i] for i in unique[a:b]], [all_messages[i] for i in unique[a:b]])
                  for a, b in _batches(len(unique), cfg.batch_size)]
        workers = cfg.num_workers or os.cpu_count() or 1
        workers = min(workers, len(chunks))
        if workers > 1:
            import concurrent.futures
            import multiprocessing

            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            results = pool.map(_encode_chunk, chunks)
        else:
            pool = None
            encoder = ConversationEncoder(tokenizer, template, cfg.system_prompt, cfg.max_length, cfg.truncation,
                                          cfg.control_tokens_in_content)
            results = (encoder.encode(conv, ids) for _, ids, conv in chunks)

        truncated = fast = slow = 0
        verbatim = True
        eot: Counter = Counter()
        lengths_all, trainable = [], 0
        try:
            with bulk_allocation():
                for (_, chunk_ids, chunk_msgs), batch in zip(chunks, results):
                    truncated += batch.truncated
                    fast += batch.fast_rows
                    verbatim &= batch.template_verbatim
                    slow += batch.slow_rows
                    eot.update(batch.end_of_turn)
                    for pos, reason, detail in batch.dropped:
                        dropped_rows.append({"id": chunk_ids[pos], "reason": reason, "detail": detail})
                    if not len(batch.kept):
                        continue
                    kept_ids = [chunk_ids[p] for p in batch.kept.tolist()]
                    codes = np.fromiter((split_code[assign_split(i, cfg.validation_fraction, cfg.test_fraction)]
                                         for i in kept_ids), dtype=np.int8, count=len(kept_ids))
                    tok_codes = np.repeat(codes, batch.lengths)
                    trainable += int(np.count_nonzero(batch.labels != IGNORE_INDEX))
                    lengths_all.append(batch.lengths)
                    for split, code in split_code.items():
                        sel = np.flatnonzero(codes == code)
                        if not len(sel):
                            continue
                        tok = tok_codes == code
                        messages = None
                        if split == "test":
                            messages = [normalize_messages(chunk_msgs[batch.kept[j]], cfg.system_prompt) for j in sel]
                        writers[split].write([kept_ids[j] for j in sel], batch.lengths[sel],
                                             batch.input_ids[tok], batch.labels[tok], messages)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            for w in writers.values():
                w.close()

        splits = {s: writers[s].rows for s in SPLITS}
        lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, dtype=np.int64)
        num_tokens = int(lengths.sum())
        if splits["train"] == 0:
            reasons = Counter(d["reason"] for d in dropped_rows)
            raise ValueError(
                f"the train split would be empty: {len(rows)} rows in, {len(dropped_rows)} dropped "
                f"({dict(reasons)}; max_length={cfg.max_length}, truncation={cfg.truncation}), "
                f"{sum(splits.values())} kept, all in validation/test. Add rows, raise max_length, or lower "
                "validation_fraction/test_fraction."
            )
        pq.write_table(pa.Table.from_pylist(dropped_rows, schema=pa.schema(
            [("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])), tmp / DROPPED_FILE)

        pack_length = cfg.effective_pack_length
        train_lengths = np.concatenate(writers["train"].lengths)
        efficiency = packing_efficiency(train_lengths, pack_length)
        packed_files, packed_sequences, packed_hashers = {}, {}, {}
        if cfg.packing:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            for split in PACKED_SPLITS:
                name = f"{split}.packed.parquet"
                packed_hashers[name] = TableHasher()
                packed_sequences[split] = write_packed_split(tmp / f"{split}.parquet", tmp / name, pack_length, pad_id,
                                                             packed_hashers[name])
                packed_files[split] = str(out_dir / name)

        digests = {f"{s}.parquet": writers[s].hasher.hexdigest() for s in SPLITS}
        digests.update({name: hasher.hexdigest() for name, hasher in packed_hashers.items()})
        seconds = time.perf_counter() - began
        info = SftDatasetInfo(
            path=str(out_dir),
            splits=splits,
            files={s: str(out_dir / f"{s}.parquet") for s in SPLITS},
            num_tokens=num_tokens,
            trainable_tokens=trainable,
            truncated=truncated,
            dropped=len(dropped_rows),
            max_length=cfg.max_length,
            template_name=template_name,
            length_histogram=_histogram(lengths.tolist(), cfg.max_length),
            truncation=cfg.truncation,
            dropped_reasons=dict(Counter(d["reason"] for d in dropped_rows)),
            rows_in=len(rows),
            fingerprint=fingerprint_value,
            content_hash=combine_digests(digests),
            trainable_token_share=round(trainable / num_tokens, 6) if num_tokens else 0.0,
            packing_efficiency=round(efficiency, 6),
            pack_length=pack_length,
            packed_files=packed_files,
            packed_sequences=packed_sequences,
            end_of_turn_tokens=dict(eot),
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            bos_prefix=_special_prefix(tokenizer),
            system_prompt=cfg.system_prompt,
            fast_path_rows=fast,
            template_verbatim=verbatim,
            slow_path_rows=slow,
            config=cfg.output_dict(),
            seconds=round(seconds, 3),
            tokens_per_second=round(num_tokens / seconds, 1) if seconds > 0 else 0.0,
        )
        (tmp / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def materialize_sft_dataset(
    rows, model_dir: str | Path, root: str | Path, cfg: TokenizationConfig | None = None
) -> SftDatasetInfo:
    """The dataset for (rows, tokenizer, template, cfg) in `root/<fingerprint>/`: reused when it is
    already complete there (reused=True, nothing tokenized), built otherwise."""
    cfg = cfg or TokenizationConfig()
    fp = fingerprint(rows, model_dir, cfg)
    out_dir = Path(root) / fp
    existing = read_sft_dataset_info(out_dir)
    if existing is not None and existing.fingerprint == fp:
        existing.reused = True
        return existing
    return build_sft_dataset(rows, model_dir, out_dir, cfg, fingerprint_value=fp)


def read_sft_dataset_info(out_dir: str | Path) -> SftDatasetInfo | None:
    """The info of a completed dataset folder, or None when it is missing or incomplete."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        return None
    info = SftDatasetInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))
    # The folder may have moved since it was written: paths follow the folder.
    folder = Path(out_dir)
    info.path = str(folder)
    info.files = {s: str(folder / Path(p).name) for s, p in info.files.items()}
    info.packed_files = {s: str(folder / Path(p).name) for s, p in info.packed_files.items()}
    return info


def load_sft_splits(path_or_info: str | Path | SftDatasetInfo, splits: Iterable[str] = SPLITS):
    """A datasets.DatasetDict of the named splits, each loaded from its own Parquet file.

    Splits are loaded one by one because test.parquet has an extra `messages` column, and
    `load_dataset("parquet", data_files={...})` needs the same columns in every file. An empty
    split (too few rows) comes back as an empty Dataset with the right columns, where
    `load_dataset` itself would fail on a file with no rows.
    """
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict, Features, load_dataset

    info = path_or_info if isinstance(path_or_info, SftDatasetInfo) else read_sft_dataset_info(path_or_info)
    if info is None:
        raise FileNotFoundError(f"no complete sft dataset at {path_or_info} (missing {INFO_FILE})")
    out = {}
    for split in splits:
        path = info.files[split]
        if info.splits.get(split, 0) == 0:
            schema = pq.read_schema(path)
            out[split] = Dataset.from_dict({n: [] for n in schema.names}, features=Features.from_arrow_schema(schema))
        else:
            out[split] = load_dataset("parquet", data_files=path, split="train")
    return DatasetDict(out)


def tokenizer_files_hash(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files (vocabulary, config, chat template) in `model_dir`."""
    h = hashlib.sha256()
    folder = Path(model_dir)
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(rows_or_ids, model_dir: str | Path, cfg: TokenizationConfig | None = None) -> str:
    """16-hex key of (conversations, tokenizer files, template text, output config): equal key, equal dataset.

    `rows_or_ids`: a DataFrame with `id` and `messages` (the messages' text is hashed, so a row whose
    text changed under the same id still changes the key), or plain row ids. Row order is ignored;
    num_workers and batch_size are left out (they do not change what is written).
    """
    cfg = cfg or TokenizationConfig()
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\0".encode())
    if hasattr(rows_or_ids, "columns") and "messages" in rows_or_ids.columns:
        per_row = []
        for row_id, messages in zip(rows_or_ids["id"], rows_or_ids["messages"]):
            try:
                text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)
            except (KeyError, TypeError):
                text = repr(messages)  # malformed: build_sft_dataset will name it
            per_row.append(f"{row_id}\x1d{text}")
        per_row.sort()
        for item in per_row:
            h.update(item.encode("utf-8", "surrogatepass") + b"\0")
    else:
        ids = rows_or_ids["id"] if hasattr(rows_or_ids, "columns") else rows_or_ids
        for row_id in sorted(str(r) for r in ids):
            h.update(row_id.encode() + b"\0")
    h.update(tokenizer_files_hash(model_dir).encode())
    if cfg.template != "tokenizer":
        path = Path(cfg.template).expanduser() if cfg.template.endswith(".jinja") else TEMPLATES_DIR / f"{cfg.template}.jinja"
        if path.is_file():
            h.update(path.read_bytes())
    h.update(json.dumps(cfg.output_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


# --- round-trip checks ----------------------------------------------------------------------------

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
