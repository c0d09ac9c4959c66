"""Render conversations with a chat template, tokenize them, mask non-assistant tokens, split, write Parquet.

Labels are -100 everywhere except the content of every assistant turn and the end-of-turn/EOS
token that closes it, so the loss teaches the model to answer and to stop. Assistant spans are
found by rendering the conversation prefix by prefix (works with any prefix-stable template,
including ones without `{% generation %}` markers, like SmolLM2's), then the whole text is
tokenized once and spans are mapped to tokens through the tokenizer's character offsets, so
token boundaries are exactly those of the full rendered text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")
INFO_FILE = "sft_dataset_info.json"
TEMPLATES_DIR = Path(__file__).parent / "templates"
# Bump when the output format or the labeling rule changes, so old fingerprints stop matching.
FORMAT_VERSION = "1"
# Markers that close an assistant turn in common templates, tried after the tokenizer's own EOS.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


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
        "help": "'tokenizer' (its own chat template), a shipped name ('chatml', 'alpaca', 'llama2') or a .jinja path."})

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
                known = ["tokenizer"] + sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
                raise ValueError(f"template must be one of {known} or a .jinja path, got {self.template!r}")
        elif self.template.endswith(".jinja") and not Path(self.template).expanduser().is_file():
            raise ValueError(f"template file does not exist: {self.template!r}")


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
    max_length: int
    template_name: str
    length_histogram: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SftDatasetInfo":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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
        raise ValueError(f"unknown template {template!r}")
    return path.read_text(encoding="utf-8"), template


# --- one conversation -----------------------------------------------------------------------------


def normalize_messages(messages: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Plain list of {role, content} dicts (from lists, numpy arrays or Arrow structs), system prompt added."""
    if messages is None or isinstance(messages, (str, bytes, dict)):
        raise ValueError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    out = []
    for m in list(messages):
        role, content = m["role"], m["content"]
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"bad message {{role={role!r}, content={type(content).__name__}}}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("conversation has no assistant turn to train on")
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _render(tokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_with_spans(
    messages: list[dict[str, str]], tokenizer, template: str
) -> tuple[str, list[tuple[int, int, bool]]]:
    """Rendered text and, per assistant turn, (start, end, needs_eos) character spans to train on.

    A span covers the content and the marker that closes the turn (EOS or end-of-turn token).
    needs_eos is True when the template closes the turn with no marker at all, so EOS is appended.
    """
    full = _render(tokenizer, template, messages, False)
    eos = tokenizer.eos_token
    markers = ([eos] if eos else []) + [m for m in END_OF_TURN_MARKERS if m != eos]
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
            start, content_end = seg_start + pos, seg_start + pos + len(content)
        elif content.strip():  # the template rewrote the content: train on the whole turn
            start = content_end = seg_start + len(seg) - len(seg.lstrip())
        else:  # an empty answer: only the closing marker / EOS is trained
            start, content_end = None, seg_start
        found = [(full.find(m, content_end, seg_end), m) for m in markers]
        found = [(j, m) for j, m in found if j >= 0]
        if found:
            j, marker = min(found)
            spans.append((j if start is None else start, j + len(marker), False))
        else:
            end = seg_start + len(seg.rstrip())
            spans.append((end if start is None else start, end, True))
    return full, spans


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text when adding special tokens (usually BOS), else []."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n > 0 and with_special[n:n + len(plain)] == plain:
        return list(with_special[:n])
    return []


def _encode(
    text: str, spans: list[tuple[int, int, bool]], tokenizer, special_prefix: list[int]
) -> dict[str, list[int]]:
    # Special tokens come from the template text itself; adding them again would double the BOS.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    inserts = []
    for start, end, needs_eos in spans:
        last = None
        for k, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                labels[k] = ids[k]
                last = k
        if needs_eos and tokenizer.eos_token_id is not None:
            if last is None:  # empty answer: EOS goes where the turn's text would have been
                last = next((k for k, (a, _) in enumerate(offsets) if a >= start), len(ids)) - 1
            inserts.append(last + 1)
    for k in sorted(inserts, reverse=True):
        ids.insert(k, tokenizer.eos_token_id)
        labels.insert(k, tokenizer.eos_token_id)
    # Tokenizers that expect a BOS get exactly one: only when the template did not write it.
    if special_prefix and ids[: len(special_prefix)] != special_prefix:
        ids = special_prefix + ids
        labels = [IGNORE_INDEX] * len(special_prefix) + labels
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_conversation(messages, tokenizer, cfg: TokenizationConfig | None = None) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels (-100 outside assistant turns) for one conversation.

    Not clipped to cfg.max_length: build_sft_dataset applies the drop/truncate policy.
    """
    cfg = cfg or TokenizationConfig()
    template, _ = resolve_template(tokenizer, cfg.template)
    msgs = normalize_messages(messages, cfg.system_prompt)
    text, spans = render_with_spans(msgs, tokenizer, template)
    return _encode(text, spans, tokenizer, _special_prefix(tokenizer))


# --- the dataset ----------------------------------------------------------------------------------


def _histogram(lengths: Iterable[int], max_length: int) -> dict[str, int]:
    edges, edge = [], 32
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    edges.append(max_length)
    counts = {}
    low = 1
    for high in edges:
        counts[f"{low}-{high}"] = 0
        low = high + 1
    keys = list(counts)
    for n in lengths:
        for key, high in zip(keys, edges):
            if n <= high:
                counts[key] += 1
                break
    return counts


def _arrow_schema(with_messages: bool):
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    cols = [
        ("id", pa.string()), ("input_ids", ints), ("attention_mask", ints), ("labels", ints), ("length", pa.int64()),
    ]
    if with_messages:
        cols.append(("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
    return pa.schema(cols)


def build_sft_dataset(
    rows, model_dir: str | Path, out_dir: str | Path, cfg: TokenizationConfig | None = None
) -> SftDatasetInfo:
    """Tokenize canonical rows with the tokenizer in `model_dir`, write train/validation/test Parquet.

    rows: DataFrame with `id` and `messages`. Writes `{split}.parquet` (id, input_ids, attention_mask,
    labels, length; test also keeps messages) and sft_dataset_info.json into `out_dir`, replacing
    what was there. Raises ValueError when no row would land in train.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    cfg = cfg or TokenizationConfig()
    cfg.validate()
    if len(rows) == 0:
        raise ValueError("build_sft_dataset got no rows")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template, template_name = resolve_template(tokenizer, cfg.template)
    prefix = _special_prefix(tokenizer)

    records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    truncated = dropped = num_tokens = trainable = 0
    for row_id, messages in zip(rows["id"], rows["messages"]):
        try:
            msgs = normalize_messages(messages, cfg.system_prompt)
            text, spans = render_with_spans(msgs, tokenizer, template)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"row {row_id}: {exc}") from exc
        enc = _encode(text, spans, tokenizer, prefix)
        if len(enc["input_ids"]) > cfg.max_length:
            if cfg.truncation == "drop":
                dropped += 1
                continue
            enc = {k: v[: cfg.max_length] for k, v in enc.items()}
            if all(x == IGNORE_INDEX for x in enc["labels"]):
                dropped += 1  # nothing left to learn from
                continue
            truncated += 1
        split = assign_split(row_id, cfg.validation_fraction, cfg.test_fraction)
        record = {"id": str(row_id), **enc, "length": len(enc["input_ids"])}
        if split == "test":
            record["messages"] = msgs
        records[split].append(record)
        num_tokens += record["length"]
        trainable += sum(1 for x in enc["labels"] if x != IGNORE_INDEX)

    if not records["train"]:
        kept = sum(len(r) for r in records.values())
        raise ValueError(
            f"the train split would be empty: {len(rows)} rows in, {dropped} dropped by max_length="
            f"{cfg.max_length} ({cfg.truncation}), {kept} kept, all in validation/test. Add rows, "
            "raise max_length, or lower validation_fraction/test_fraction."
        )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a reader never sees a half-written dataset.
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for split in SPLITS:
            schema = _arrow_schema(split == "test")
            table = pa.Table.from_pylist(records[split], schema=schema)
            pq.write_table(table, tmp / f"{split}.parquet")
            files[split] = str(out_dir / f"{split}.parquet")
        info = SftDatasetInfo(
            path=str(out_dir),
            splits={s: len(records[s]) for s in SPLITS},
            files=files,
            num_tokens=num_tokens,
            trainable_tokens=trainable,
            truncated=truncated,
            dropped=dropped,
            max_length=cfg.max_length,
            template_name=template_name,
            length_histogram=_histogram((r["length"] for s in SPLITS for r in records[s]), cfg.max_length),
        )
        (tmp / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def read_sft_dataset_info(out_dir: str | Path) -> SftDatasetInfo | None:
    """The info of a completed dataset folder, or None when it is missing or incomplete."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        return None
    return SftDatasetInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))


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


def fingerprint(row_ids: Iterable[str], model_dir: str | Path, cfg: TokenizationConfig | None = None) -> str:
    """16-hex key of (row ids, tokenizer files, template text, cfg): equal key, equal dataset.

    Row ids are content hashes, so the ids alone stand for the conversations; order is ignored.
    """
    cfg = cfg or TokenizationConfig()
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\0".encode())
    for row_id in sorted(str(r) for r in row_ids):
        h.update(row_id.encode() + b"\0")
    h.update(tokenizer_files_hash(model_dir).encode())
    if cfg.template != "tokenizer":
        path = Path(cfg.template).expanduser() if cfg.template.endswith(".jinja") else TEMPLATES_DIR / f"{cfg.template}.jinja"
        if path.is_file():
            h.update(path.read_bytes())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]
