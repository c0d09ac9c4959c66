"""Read instruction data from files and datasets and map every record to the canonical row.

Input shapes: Alpaca (`instruction`, `input`, `output`), Dolly (`instruction`, `context`,
`response`), ShareGPT (`conversations` of `{from, value}`), OpenAI-style `messages`, and
`prompt`/`completion`. Every record ends up either as a row or as a rejected row with a reason.

Modules: `sources` (SourceSpec, load_sources), `shapes` (detect_shape, to_messages),
`readers` (one per file format, gzip and byte-order marks, Hugging Face datasets), `frames` (schema-complete DataFrames).
"""

from sft_pipeline.ingest.frames import rejects_frame, rows_frame
from sft_pipeline.ingest.readers import (
    DEFAULT_MAX_RECORD_CHARS,
    FILE_SUFFIXES,
    GZIP_SUFFIXES,
    HF_PREFIX,
    READERS,
    Item,
    file_format,
)
from sft_pipeline.ingest.shapes import SHAPES, SHAREGPT_ROLES, RecordError, detect_shape, to_messages
from sft_pipeline.ingest.sources import (
    DEFAULT_SEED_FILES,
    PACKAGE_DATA,
    IngestResult,
    SourceSpec,
    default_sources,
    expand_source,
    load_sources,
    source_name,
)

__all__ = [
    "DEFAULT_MAX_RECORD_CHARS",
    "DEFAULT_SEED_FILES",
    "FILE_SUFFIXES",
    "GZIP_SUFFIXES",
    "HF_PREFIX",
    "PACKAGE_DATA",
    "READERS",
    "SHAPES",
    "SHAREGPT_ROLES",
    "IngestResult",
    "Item",
    "RecordError",
    "SourceSpec",
    "default_sources",
    "detect_shape",
    "expand_source",
    "file_format",
    "load_sources",
    "rejects_frame",
    "rows_frame",
    "source_name",
    "to_messages",
]
