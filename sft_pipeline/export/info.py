"""`ChampionExportInfo`: the hand-off of `champion_export`, one immutable folder holding every export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.outputs import OutputInfo

MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"
GGUF_DIR = "gguf"
EXPORT_RECORD = "export.json"
KEYS_DIR = "keys"


@dataclass(frozen=True)
class ChampionExportInfo(OutputInfo):
    """The champion's exports (`<path>/merged/`, `<path>/adapter/`, `<path>/gguf/`), how each was verified, and
    which version they are of. `path` is empty when no version held the alias (nothing was exported).

    `exports[name]` for name in merged, adapter, gguf: {"status": "verified" | "skipped", "path", "reason",
    "figures" (the verification), plus facts: base model, serve commands, GGUF file and type}.
    """

    key: str = ""
    model_name: str = ""
    alias: str = "champion"
    version: int | None = None
    model_sha256: str = ""
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompts: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    note: str = ""

    @property
    def exported(self) -> bool:
        return bool(self.path)

    def export_path(self, name: str) -> Path | None:
        """Where export `name` (merged, adapter, gguf) is, or None when it was not written."""
        entry = self.exports.get(name) or {}
        return Path(entry["path"]) if entry.get("status") == "verified" and entry.get("path") else None

    def verify(self) -> None:
        """Check the files against the recorded digest (nothing to check when nothing was exported)."""
        if self.path:
            super().verify()
