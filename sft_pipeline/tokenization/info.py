"""SftDatasetInfo (what a written dataset holds), and reading a dataset folder and its splits back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sft_pipeline.hashing import combine_digests, parquet_digest
from sft_pipeline.tokenization.config import DROPPED_FILE, INFO_FILE, SPLITS


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
    file_sizes: dict[str, int] = field(default_factory=dict)
    """Bytes of each Parquet file as written, by file name: the cheap check before a folder is reused."""
    file_digests: dict[str, str] = field(default_factory=dict)
    """Per-file part of content_hash (content_hash = combine_digests(file_digests)), so a mismatch names its file."""
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SftDatasetInfo":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def hashed_files(self) -> dict[str, str]:
        """File name -> path of the files content_hash covers, in the order their digests are combined."""
        out = {Path(self.files[s]).name: self.files[s] for s in SPLITS}
        out.update({Path(p).name: p for p in self.packed_files.values()})
        return out


def find_damage(info: SftDatasetInfo, full_hash_max_bytes: int) -> str | None:
    """Why the folder `info` describes no longer holds what was written (a sentence naming the file), or None.

    Always (cheap: no data page is read): every file is present, has the size recorded when it was
    written and a readable Parquet footer with the recorded row count. When the hashed files total at
    most `full_hash_max_bytes`, their rows are also hashed and compared with `content_hash`, which finds
    a change that keeps size and footer (a flipped byte in a data page).
    """
    import pyarrow.parquet as pq

    expected = {Path(info.files[s]).name: (info.files[s], info.splits.get(s, 0)) for s in SPLITS}
    for split, path in info.packed_files.items():
        expected[Path(path).name] = (path, info.packed_sequences.get(split, 0))
    expected[DROPPED_FILE] = (str(Path(info.path) / DROPPED_FILE), info.dropped)
    hashed = info.hashed_files()
    total = 0
    for name, (path, rows) in expected.items():
        file = Path(path)
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        recorded = info.file_sizes.get(name)
        if recorded is not None and size != recorded:
            return f"{name} has {size} bytes where {recorded} were written"
        try:
            num_rows = pq.read_metadata(file).num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a cut or overwritten footer
            return f"{name} is not a readable Parquet file ({exc})"
        if num_rows != rows:
            return f"{name} holds {num_rows} rows where {rows} were written"
        if name in hashed:
            total += size
    if not info.content_hash:
        return f"{INFO_FILE} records no content_hash"
    if total > full_hash_max_bytes:
        return None
    digests = {}
    for name, path in hashed.items():
        try:
            digests[name] = parquet_digest(path)
        except Exception as exc:  # a damaged data page: decompression or decoding fails
            return f"the rows of {name} cannot be read ({exc})"
        recorded = info.file_digests.get(name)
        if recorded is not None and digests[name] != recorded:
            return f"the rows of {name} differ from those written (digest {digests[name][:16]}, recorded {recorded[:16]})"
    if combine_digests(digests) != info.content_hash:
        return f"the rows differ from those written (content_hash {info.content_hash[:16]} recorded)"
    return None


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
