"""The names of the tags the registry writes on versions, runs and registered models."""

from __future__ import annotations

# Version tags unless said otherwise.
TAG_MODEL_SHA = "sft_pipeline.model_sha256"
TAG_REGISTRATION_KEY = "sft_pipeline.registration_key"
TAG_LOG_MODE = "sft_pipeline.log_mode"
TAG_GATE_PASSED = "gate_passed"
SCORE_PREFIX = "score."  # score.<metric> on the version: what promotion compares
PROMOTION_PREFIX = "sft_pipeline.promotion."  # promotion.<alias> = promoted | kept; .reason
HISTORY_PREFIX = "sft_pipeline.alias_history."  # registered-model tags, one per alias move
DATASET_SHA_PREFIX = "dataset_sha256."  # dataset_sha256.<split> on the version
