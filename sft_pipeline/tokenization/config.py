"""TokenizationConfig (how conversations become training sequences) and the stage's constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.tokenization.templates import TEMPLATES_DIR, shipped_templates

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")
PACKED_SPLITS = ("train", "validation")
INFO_FILE = "sft_dataset_info.json"
DROPPED_FILE = "dropped.parquet"
# Bump when the output format or the labeling rule changes, so old fingerprints stop matching.
FORMAT_VERSION = "2"
# Config fields that do not change what is written (speed, and the checks applied to an output): not
# part of the fingerprint. The checks run on a reused folder too, so a stricter setting still applies.
_NON_OUTPUT_FIELDS = ("num_workers", "batch_size", "max_dropped_share", "reuse_full_hash_max_bytes")


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
    test_fraction: float = field(default=0.15, metadata={
        "help": "Share of rows (by id hash) held out for the final task evaluation (0.15: about 85 of the demo's "
                "555 tickets, enough for a paired test that can show a gain)."})
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
    max_dropped_share: float = field(default=0.5, metadata={
        "help": "Fail (nothing is published) when more than this share of the input rows is dropped (too long, "
                "duplicate id, control token), naming each reason with its count and the setting to change. "
                "1.0 accepts any share."})
    reuse_full_hash_max_bytes: int = field(default=1 << 30, metadata={
        "help": "An existing dataset folder is reused only after a check: every file present, with the size and "
                "a readable Parquet footer with the row count recorded when it was written, always; when the hashed "
                "files total at most this many bytes, their rows are also hashed and compared with content_hash "
                "(about 20 MB/s of Parquet per core). A folder that fails is rebuilt. 0: never hash."})

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
        share = self.max_dropped_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"max_dropped_share must be a number in [0, 1], got {share!r}")
        limit = self.reuse_full_hash_max_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"reuse_full_hash_max_bytes must be an integer >= 0, got {limit!r}")
        if not isinstance(self.packing, bool):
            raise ValueError(f"packing must be true or false, got {self.packing!r}")

    @property
    def effective_pack_length(self) -> int:
        return self.pack_length or self.max_length

    def output_dict(self) -> dict[str, Any]:
        """The fields that decide what is written (what the fingerprint covers)."""
        return {k: v for k, v in asdict(self).items() if k not in _NON_OUTPUT_FIELDS}
