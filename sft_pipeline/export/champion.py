"""The version aliased `champion` in MLflow: which one it is, its lineage, and its logged files on local disk.

The export reads the registry, not the Dagster hand-off: the alias can move without a pipeline run (a
rollback with `registry.set_alias`, the MLflow UI), so the version to export is whatever the alias names now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.registry.tags import TAG_LOG_MODE, TAG_MODEL_SHA

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class ChampionVersion:
    """A registered version as the registry describes it (no files touched)."""

    model_name: str
    version: int
    model_sha256: str
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    alias: str = CHAMPION_ALIAS

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"

    @property
    def log_mode(self) -> str:
        return self.tags.get(TAG_LOG_MODE, "adapter")

    def lineage(self) -> dict[str, Any]:
        """Where the version came from: MLflow runs, the Dagster run, data and code versions, dataset digests."""
        keep = ("dagster_run_id", "dagster_run_url", "training_run_id", "evaluation_run_id", "base_model_source",
                "base_model_revision", "gate_passed", "gate_reasons")
        out: dict[str, Any] = {"model_name": self.model_name, "version": self.version, "model_uri": self.model_uri,
                               "model_sha256": self.model_sha256, "registration_run_id": self.run_id}
        out.update({k: self.tags[k] for k in keep if self.tags.get(k)})
        for prefix in ("data_version.", "code_version.", "dataset_sha256.", "score."):
            values = {k[len(prefix):]: v for k, v in sorted(self.tags.items()) if k.startswith(prefix)}
            if values:
                out[prefix.rstrip(".")] = values
        return out


@dataclass(frozen=True)
class LoggedModel:
    """The version's logged files on local disk, as the MLflow transformers flavor saved them."""

    root: Path
    tokenizer_dir: Path
    base_model_dir: Path | None  # the local base folder an adapter version loads over
    adapter_dir: Path | None  # PEFT adapter (adapter mode)
    model_dir: Path | None  # full weights (merged mode)
    flavor: dict[str, Any] = field(default_factory=dict)


def find_champion(tracking_uri: str, model_name: str, alias: str = CHAMPION_ALIAS) -> ChampionVersion | None:
    """The version `alias` points to now, or None when the model or the alias does not exist."""
    from sft_pipeline.tracking import client

    mlflow_client = client(tracking_uri)
    try:
        mv = mlflow_client.get_model_version_by_alias(model_name, alias)
    except Exception as exc:  # no such registered model, or no such alias: nothing to export
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower() or "INVALID_PARAMETER_VALUE" in str(exc):
            return None
        raise
    tags = dict(mv.tags or {})
    return ChampionVersion(model_name=model_name, version=int(mv.version), model_sha256=tags.get(TAG_MODEL_SHA, ""),
                           run_id=mv.run_id or "", source=mv.source or "", tags=tags,
                           description=mv.description or "", alias=alias)


def download_logged_model(tracking_uri: str, champion: ChampionVersion, dest: str | Path) -> LoggedModel:
    """Download the version's model artifacts into `dest` and find its parts (adapter, weights, tokenizer, base)."""
    import yaml

    from sft_pipeline.tracking import use_tracking_uri

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with use_tracking_uri(tracking_uri) as mlflow:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=champion.model_uri, dst_path=str(dest)))
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{champion.model_uri}: no MLmodel in the downloaded artifacts ({root})")
    flavor = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")).get("flavors") or {}).get("transformers") or {}
    if not flavor:
        raise ValueError(f"{champion.model_uri} was not logged with the transformers flavor")
    adapter = root / flavor["peft_adaptor"] if flavor.get("peft_adaptor") else None
    model_dir = root / "model" if (root / "model" / "config.json").is_file() else None
    tokenizer_dir = root / "components" / "tokenizer"
    base = flavor.get("local_base_model_path") or None
    base_dir = Path(base) if base else None
    if adapter is not None and (base_dir is None or not (base_dir / "config.json").is_file()):
        raise FileNotFoundError(
            f"{champion.model_uri} is an adapter over the local base folder {base!r}, which is not on this machine; "
            "export where the pipeline's artifacts are (or register with log_mode=merged)")
    if adapter is None and model_dir is None:
        raise FileNotFoundError(f"{champion.model_uri}: neither a PEFT adapter nor full weights in {root}")
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer_dir = model_dir if model_dir is not None else base_dir  # older layouts keep it with the weights
    return LoggedModel(root=root, tokenizer_dir=tokenizer_dir, base_model_dir=base_dir, adapter_dir=adapter,
                       model_dir=model_dir, flavor=flavor)


def held_out_split_path(tracking_uri: str, champion: ChampionVersion) -> Path | None:
    """The tokenized test split the version was evaluated on (its registration run's dataset input `test`), when
    the file is still there and still has the digest recorded on the version; else None."""
    from sft_pipeline.hashing import file_digest
    from sft_pipeline.tracking import client

    if not champion.run_id:
        return None
    try:
        run = client(tracking_uri).get_run(champion.run_id)
    except Exception:
        return None
    for dataset_input in getattr(run.inputs, "dataset_inputs", None) or []:
        context = {t.key: t.value for t in dataset_input.tags}.get("mlflow.data.context")
        if context != "test":
            continue
        source = dataset_input.dataset.source
        try:
            parsed = json.loads(source)
            source = parsed.get("uri") or parsed.get("path") or source if isinstance(parsed, dict) else source
        except (TypeError, ValueError):
            pass
        path = Path(str(source).removeprefix("file://"))
        if not path.is_file():
            return None
        recorded = champion.tags.get("dataset_sha256.test")
        if recorded and file_digest(path) != recorded:
            return None
        return path
    return None
