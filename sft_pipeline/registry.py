"""MLflow logging and model registry: log a fine-tuned model, register a version, set aliases.

Plain domain module: no Dagster import, and mlflow is imported inside the functions.

Model logging choice: the MLflow ``transformers`` flavor with a PEFT model and
``base_model_path`` (MLflow >= 3.x). MLflow saves only the adapter (under ``peft/``) plus the
tokenizer, and records the *local* base model folder as a reference that is loaded at
``load_model`` time, so nothing touches the Hugging Face Hub and a version costs megabytes,
not a copy of the base weights. It loads back with ``mlflow.transformers.load_model`` (a
PeftModel inside a text-generation pipeline) or ``mlflow.pyfunc.load_model(...).predict``.
The trade-off: the base folder must exist at that path where the model is loaded (it is a
content-addressed folder under the artifact root). A full fine-tune (a folder with
``config.json`` and no ``adapter_config.json``) is logged with its weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_ARTIFACT_NAME = "model"


@dataclass
class RegistrationInfo:
    """A registered model version and where it came from."""

    run_id: str
    model_name: str
    version: int
    aliases: list[str]
    model_uri: str  # models:/<name>/<version>
    source_uri: str = ""  # the logged model the version points to
    experiment_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local artifact folder next to a SQLite tracking DB (``<db dir>/mlartifacts``), else None.

    MLflow's default for a database backend is ``./mlruns`` relative to the *current working
    directory*, which scatters artifacts depending on who launched the process (Dagster, a
    shell, pytest). Pinning it beside the DB keeps the store self-contained.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or other backend decides its own artifact store
    db_path = Path(tracking_uri[len("sqlite:///"):])  # "sqlite:////abs" -> "/abs"; "sqlite:///rel" -> "rel"
    return (db_path.resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Return the id of experiment `name`, creating it (with a local artifact location) if needed."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).resolve().parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root_for(tracking_uri)
    location = f"{root}/{_safe_name(name)}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process (a parallel Dagster step) may have created it in the meantime.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


@contextlib.contextmanager
def _tracking(tracking_uri: str):
    """Point MLflow's fluent API at `tracking_uri` for the block, then restore the caller's state exactly.

    `mlflow.set_tracking_uri`/`set_registry_uri` also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI
    and cannot be undone through the public API: restoring "the previous URI" by calling them again
    would pin every later `MlflowClient(tracking_uri=...)` in this process to the old registry.
    So the module globals and environment variables are saved and put back as they were.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in env_names}
    saved_globals = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved_globals
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's inference would re-load the model in a subprocess (slow).
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


def _load_for_logging(weights_dir: Path, base_model_dir: Path):
    """Return (model, tokenizer, is_peft) for the folder produced by training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_peft = (weights_dir / "adapter_config.json").is_file()
    tok_dir = weights_dir if (weights_dir / "tokenizer_config.json").is_file() else base_model_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if is_peft:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model_dir)
        model = PeftModel.from_pretrained(base, weights_dir)
    elif (weights_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(weights_dir)
    else:
        raise FileNotFoundError(f"{weights_dir} holds neither a PEFT adapter nor a Hugging Face model")
    return model, tokenizer, is_peft


def register_model(
    tracking_uri: str,
    model_name: str,
    adapter_dir: str | Path,
    base_model_dir: str | Path,
    *,
    metrics: dict[str, float],
    params: dict[str, Any],
    tags: dict[str, Any],
    alias: str = "candidate",
    experiment: str = "sft_pipeline",
    promote_to: str | None = None,
    training_run_id: str | None = None,
    run_name: str | None = None,
) -> RegistrationInfo:
    """Log the fine-tuned model in a new MLflow run, register it as a new version of `model_name`.

    The version gets alias `alias` (and `promote_to`, e.g. "champion", when given) and every tag
    in `tags`; the run gets the same tags, `params` and `metrics` (non-finite metrics skipped).
    """
    adapter_dir, base_model_dir = Path(adapter_dir).resolve(), Path(base_model_dir).resolve()
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter_dir {adapter_dir} does not exist")
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"base_model_dir {base_model_dir} is not a Hugging Face model folder")
    if not model_name or not alias:
        raise ValueError("model_name and alias must be non-empty")
    from mlflow import MlflowClient

    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    exp_id = ensure_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    model, tokenizer, is_peft = _load_for_logging(adapter_dir, base_model_dir)

    run_tags = {"sft_pipeline.stage": "registration", **str_tags}
    if training_run_id:
        run_tags["training_run_id"] = training_run_id
    with _tracking(tracking_uri) as mlflow:
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as run:
            run_params = {k: str(v)[:6000] for k, v in (params or {}).items()}
            run_params.update(base_model_dir=str(base_model_dir), adapter_dir=str(adapter_dir))
            mlflow.log_params(run_params, synchronous=True)
            clean = {k: float(v) for k, v in (metrics or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if clean:
                mlflow.log_metrics(clean, synchronous=True)
            log_kwargs = {"base_model_path": str(base_model_dir)} if is_peft else {}
            model_info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name=MODEL_ARTIFACT_NAME,
                task="text-generation",
                pip_requirements=_pip_requirements(),
                **log_kwargs,
            )
        mv = mlflow.register_model(model_info.model_uri, model_name, tags=str_tags or None)

    version = int(mv.version)
    client.set_registered_model_alias(model_name, alias, version)
    if promote_to:
        client.set_registered_model_alias(model_name, promote_to, version)
    # Tag again through the client: register_model's tags are applied after creation, so this
    # also covers a backend that ignored them.
    for key, value in str_tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    if training_run_id:
        client.set_model_version_tag(model_name, str(version), "training_run_id", training_run_id)
    aliases = sorted(client.get_model_version(model_name, str(version)).aliases)
    return RegistrationInfo(
        run_id=run.info.run_id,
        model_name=model_name,
        version=version,
        aliases=aliases,
        model_uri=f"models:/{model_name}/{version}",
        source_uri=model_info.model_uri,
        experiment_id=exp_id,
    )


def get_model_version_by_alias(tracking_uri: str, model_name: str, alias: str):
    """The `mlflow.entities.model_registry.ModelVersion` that `alias` points to (raises if none)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return client.get_model_version_by_alias(model_name, alias)


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int | str) -> None:
    """Point `alias` (e.g. "champion") at `version`; used when a gate promotes a candidate."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        model_name, alias, str(version)
    )
