"""The fingerprint of a dataset: the key over all that decides what is written (rows, tokenizer, template, config)."""

from __future__ import annotations

from pathlib import Path

from sft_pipeline.hashing import bytes_digest, file_digest, files_digest, json_digest, short
from sft_pipeline.tokenization.config import FORMAT_VERSION, TokenizationConfig
from sft_pipeline.tokenization.templates import TEMPLATES_DIR

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


def tokenizer_files_hash(model_dir: str | Path) -> str:
    """Digest of the tokenizer files (vocabulary, config, chat template) in `model_dir`, by name."""
    folder = Path(model_dir)
    return files_digest([folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()], root=folder)


def _rows_digest(rows_or_ids) -> str:
    """Digest of the conversations (id and every message's role and text), or of plain ids; order ignored."""
    if hasattr(rows_or_ids, "columns") and "messages" in rows_or_ids.columns:
        per_row = []
        for row_id, messages in zip(rows_or_ids["id"], rows_or_ids["messages"]):
            try:
                text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)
            except (KeyError, TypeError):
                text = repr(messages)  # malformed: build_sft_dataset will name it
            per_row.append(f"{row_id}\x1d{text}")
        per_row.sort()
        return bytes_digest("".join(item + "\0" for item in per_row).encode("utf-8", "surrogatepass"))
    ids = rows_or_ids["id"] if hasattr(rows_or_ids, "columns") else rows_or_ids
    return bytes_digest("".join(row_id + "\0" for row_id in sorted(str(r) for r in ids)).encode())


def fingerprint(rows_or_ids, model_dir: str | Path, cfg: TokenizationConfig | None = None) -> str:
    """16-hex key of (conversations, tokenizer files, template text, output config): equal key, equal dataset.

    `rows_or_ids`: a DataFrame with `id` and `messages` (the messages' text is hashed, so a row whose
    text changed under the same id still changes the key), or plain row ids. Row order is ignored;
    num_workers and batch_size are left out (they do not change what is written).
    """
    cfg = cfg or TokenizationConfig()
    template = None
    if cfg.template != "tokenizer":
        shipped = TEMPLATES_DIR / f"{cfg.template}.jinja"
        path = Path(cfg.template).expanduser() if cfg.template.endswith(".jinja") else shipped
        if path.is_file():
            template = file_digest(path)
    return short(json_digest({
        "format": FORMAT_VERSION,
        "rows": _rows_digest(rows_or_ids),
        "tokenizer": tokenizer_files_hash(model_dir),
        "template": template,
        "config": cfg.output_dict(),
    }))
