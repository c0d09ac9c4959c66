"""Moved to `sft_pipeline.augmentation.teachers`; this shim goes when the Dagster layer imports from there."""
from sft_pipeline.augmentation.teachers import *  # noqa: F401,F403
from sft_pipeline.augmentation.teachers import __all__  # noqa: F401
