"""Tokenization: render conversations with a chat template, tokenize, label assistant turns, split, write Parquet.

One job per module, in the order the data goes through them:

- config:      TokenizationConfig and the stage's constants (IGNORE_INDEX, SPLITS, file names, FORMAT_VERSION)
- templates:   the shipped chat templates, choosing the Jinja text (resolve_template), its syntax checked
- tokens:      end-of-turn markers, the BOS prefix, control tokens of a tokenizer
- render:      one conversation rendered, its assistant spans located (the reference, slow path)
- verbatim:    the syntax-tree proof that a template copies contents verbatim
- encode:      ConversationEncoder: a batch rendered (fast path), tokenized, labeled, length policy applied
- workers:     worker processes, and the allocator settings of the batch loop
- write:       split assignment by id, split Parquet files written while hashed
- pack:        packed sequences, and the block-diagonal mask that keeps packed examples apart
- info:        SftDatasetInfo, reading a dataset folder and its splits back, find_damage (check before reuse)
- fingerprint: the key of a dataset (rows, tokenizer files, template, output config)
- dataset:     build_sft_dataset (atomic folder), materialize_sft_dataset (verified reuse by fingerprint),
               check_dropped_share
- verify:      the round-trip checks (CHECK_NAMES, verify_sft_dataset)
"""

from sft_pipeline.tokenization.config import (
    DROPPED_FILE,
    FORMAT_VERSION,
    IGNORE_INDEX,
    INFO_FILE,
    PACKED_SPLITS,
    SPLITS,
    TokenizationConfig,
)
from sft_pipeline.tokenization.dataset import build_sft_dataset, check_dropped_share, materialize_sft_dataset
from sft_pipeline.tokenization.encode import ConversationEncoder, EncodedBatch, tokenize_conversation
from sft_pipeline.tokenization.fingerprint import fingerprint, tokenizer_files_hash
from sft_pipeline.tokenization.info import SftDatasetInfo, find_damage, load_sft_splits, read_sft_dataset_info
from sft_pipeline.tokenization.pack import pack_bins, packed_attention_mask, packing_efficiency, write_packed_split
from sft_pipeline.tokenization.render import normalize_messages, render_with_spans
from sft_pipeline.tokenization.templates import TEMPLATES_DIR, check_template_syntax, resolve_template, shipped_templates
from sft_pipeline.tokenization.tokens import END_OF_TURN_MARKERS, control_tokens, end_of_turn_markers
from sft_pipeline.tokenization.verbatim import template_writes_content_verbatim
from sft_pipeline.tokenization.verify import CHECK_NAMES, CheckOutcome, verify_sft_dataset
from sft_pipeline.tokenization.workers import HEAP_TRIM_THRESHOLD, bulk_allocation
from sft_pipeline.tokenization.write import PARQUET_WRITE_OPTIONS, assign_split, split_position

__all__ = [
    "CHECK_NAMES",
    "DROPPED_FILE",
    "END_OF_TURN_MARKERS",
    "FORMAT_VERSION",
    "HEAP_TRIM_THRESHOLD",
    "IGNORE_INDEX",
    "INFO_FILE",
    "PACKED_SPLITS",
    "PARQUET_WRITE_OPTIONS",
    "SPLITS",
    "TEMPLATES_DIR",
    "CheckOutcome",
    "ConversationEncoder",
    "EncodedBatch",
    "SftDatasetInfo",
    "TokenizationConfig",
    "assign_split",
    "build_sft_dataset",
    "bulk_allocation",
    "check_dropped_share",
    "check_template_syntax",
    "control_tokens",
    "end_of_turn_markers",
    "find_damage",
    "fingerprint",
    "load_sft_splits",
    "materialize_sft_dataset",
    "normalize_messages",
    "pack_bins",
    "packed_attention_mask",
    "packing_efficiency",
    "read_sft_dataset_info",
    "render_with_spans",
    "resolve_template",
    "shipped_templates",
    "split_position",
    "template_writes_content_verbatim",
    "tokenize_conversation",
    "tokenizer_files_hash",
    "verify_sft_dataset",
    "write_packed_split",
]
