"""The I/O manager that stores every asset's hand-off dataclass and gives it to the assets downstream.

A hand-off is small (paths, counts, digests); the heavy data it names stays in its immutable folder.
Each materialization's hand-off is written atomically to `<root>/<asset>/handoffs/<run_id>.json`.
A downstream step reads the hand-off its own run wrote when the upstream asset ran in the same run, else
the one of the upstream asset's latest materialization: so two overlapping runs each read their own
upstream outputs, never each other's.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

from sft_pipeline.defs.resources import default_artifact_root

HANDOFF_DIR = "handoffs"


def encode(value: Any) -> dict[str, Any]:
    """A hand-off dataclass as JSON-able data, with the class it is rebuilt as."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"an asset must return its hand-off dataclass, got {type(value).__name__}")
    data = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return {"type": f"{type(value).__module__}:{type(value).__qualname__}", "value": data}


def decode(payload: dict[str, Any]) -> Any:
    module, _, name = payload["type"].partition(":")
    cls = getattr(importlib.import_module(module), name)
    data = payload["value"]
    if hasattr(cls, "from_dict"):
        return cls.from_dict(data)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def identity(value: Any) -> str:
    """The digest that identifies a hand-off's content (its asset's data version)."""
    for name in ("digest", "content_hash", "weights_hash", "model_sha256"):
        if getattr(value, name, None):
            return str(getattr(value, name))
    return ""


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class HandoffIOManager(dg.ConfigurableIOManager):
    """Stores each asset's hand-off dataclass as JSON next to its outputs (one file per run)."""

    root: str = pydantic.Field(default_factory=default_artifact_root, description="Artifact root (env SFT_PIPELINE_HOME/artifacts).")

    def _path(self, asset_key: dg.AssetKey, run_id: str) -> Path:
        return Path(self.root).joinpath(*asset_key.path, HANDOFF_DIR, f"{run_id}.json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        path = self._path(context.asset_key, context.run_id)
        _write_atomically(path, json.dumps(encode(obj), indent=2, default=str))
        context.add_output_metadata({"handoff": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        run_id = self._current_run_id(context)
        source_run = run_id
        if run_id is None or not self._path(key, run_id).is_file():
            event = context.instance.get_latest_materialization_event(key)
            if event is None:
                raise FileNotFoundError(f"{key.to_user_string()} was never materialized: materialize it first")
            source_run = event.run_id
        path = self._path(key, source_run)
        if not path.is_file():
            raise FileNotFoundError(
                f"{key.to_user_string()}: its latest materialization (run {source_run}) left no hand-off at {path}; "
                "it was written under another artifact root or by an older version: rematerialize it"
            )
        value = self._read(path)
        if source_run != run_id and hasattr(value, "verify"):
            # Written by an earlier run: its files must still be what was recorded before anything uses them.
            value.verify()
        if run_id is not None:
            # What this step really read. Dagster's own `input_data_version` tag is the upstream asset's latest
            # materialization when the step started, which another run may have replaced in between.
            context.add_input_metadata({"handoff": dg.MetadataValue.path(str(path)), "materialized_by_run": source_run,
                                        "digest": identity(value)})
        return value

    @staticmethod
    def _current_run_id(context: dg.InputContext) -> str | None:
        try:
            return context.step_context.run_id
        except Exception:  # loaded outside a run (defs.load_asset_value): no step context
            return None

    @staticmethod
    def _read(path: Path) -> Any:
        return decode(json.loads(path.read_text(encoding="utf-8")))
