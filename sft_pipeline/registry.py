"""MLflow logging and model registry: log a fine-tuned model, register a version, move aliases.

Plain domain module: no Dagster import, and mlflow is imported inside the functions.

What a registered version is
----------------------------
* **A loadable model.** The MLflow ``transformers`` flavor, task ``text-generation``, with a
  signature (string in, string out, generation params), an input example and a model card
  (``model_card.md``: data, config, scores). Two ways to store the weights (``log_mode``):

  - ``"adapter"`` (default): MLflow saves only the PEFT adapter (under ``peft/``) plus the
    tokenizer and records the *local* base model folder (``base_model_path``) that is loaded at
    ``load_model`` time: nothing touches the Hugging Face Hub and a version costs megabytes. The
    trade-off: the base folder must exist at that path where the model is loaded.
  - ``"merged"``: the adapter is merged into the base weights (``merge_and_unload``) and the
    full model is stored: self-contained, portable, as big as the base model.

  When the tokenizer has a chat template, the model is logged with a ``prompt_template`` made
  from it, so ``predict(["an instruction"])`` formats the instruction the way the model was
  trained (user turn + generation prompt) and returns only the generated text.

* **Idempotent.** The model files are hashed (sha256); the version is tagged with that hash and
  with a registration key (the hash plus the caller's ``lineage_key``, e.g. the training run).
  Registering the same model again returns the existing version instead of a new one.

* **Gated, compare-and-set promotion.** ``candidate`` goes to every new version. ``champion``
  (``promote_to``) moves only when the caller says the gate passed and, with a
  ``promotion_metric``, only when the version *beats* the current champion on it. The decision
  and its reason are tagged on the version. The read-compare-set runs under a file lock (beside
  the SQLite store, or in the temp folder for a tracking server) and re-reads the alias after
  setting it, so two concurrent registrations cannot both take ``champion``.

* **Alias history.** Every alias move made through this module is recorded as a tag of the
  registered model (``sft_pipeline.alias_history.<time>-<id>``: JSON with alias, version,
  previous version, reason, run); ``alias_history(tracking_uri, name)`` returns them in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_ARTIFACT_NAME = "model"
LOG_MODES = ("adapter", "merged")

# Tag names (version tags unless said otherwise).
TAG_MODEL_SHA = "sft_pipeline.model_sha256"
TAG_REGISTRATION_KEY = "sft_pipeline.registration_key"
TAG_LOG_MODE = "sft_pipeline.log_mode"
TAG_GATE_PASSED = "gate_passed"
SCORE_PREFIX = "score."  # score.<metric> on the version: what promotion compares
PROMOTION_PREFIX = "sft_pipeline.promotion."  # promotion.<alias> = promoted | kept; .reason
HISTORY_PREFIX = "sft_pipeline.alias_history."  # registered-model tags, one per alias move


@dataclass
class PromotionDecision:
    """Whether a version took an alias (e.g. champion), and why."""

    alias: str
    version: int
    promoted: bool
    reason: str
    previous_version: int | None = None
    metric: str | None = None
    score: float | None = None
    previous_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    created: bool = True  # False: the same model was registered before, this is that version
    model_sha256: str = ""
    log_mode: str = "adapter"
    promotion: dict[str, Any] | None = None  # PromotionDecision.to_dict() when promotion was attempted
    dataset_digests: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# Tracking store plumbing


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local artifact folder next to a SQLite tracking DB (``<db dir>/mlartifacts``), else None.

    MLflow's default for a database backend is ``./mlruns`` relative to the *current working
    directory*, which scatters artifacts depending on who launched the process (Dagster, a
    shell, pytest). Pinning it beside the DB keeps the store self-contained.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or other backend decides its own artifact store
    return (_sqlite_path(tracking_uri).resolve().parent / "mlartifacts").as_uri()


def _sqlite_path(tracking_uri: str) -> Path:
    return Path(tracking_uri[len("sqlite:///"):])  # "sqlite:////abs" -> "/abs"; "sqlite:///rel" -> "rel"


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Return the id of experiment `name`, creating it (with a local artifact location) if needed."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        _sqlite_path(tracking_uri).resolve().parent.mkdir(parents=True, exist_ok=True)
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


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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


# ------------------------------------------------------------------------------------------
# Hashing


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_model_files(folder: str | Path) -> str:
    """sha256 over every file of a model/adapter folder (relative names and bytes), README excluded.

    The README that PEFT writes is a generated template, not part of the model.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "README.md":
            continue
        digest.update(rel.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# Logging the model


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


DEFAULT_EXAMPLE_PROMPT = "Give three tips for staying healthy."
GENERATION_PARAMS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0}


def chat_prompt_template(tokenizer) -> str | None:
    """An MLflow ``prompt_template`` (with one ``{prompt}``) from the tokenizer's chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "PROMPTMARKER7f3a"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    except Exception:
        return None
    if not isinstance(text, str) or text.count(marker) != 1 or "{" in text or "}" in text:
        return None  # braces would break str.format in MLflow's template handling
    return text.replace(marker, "{prompt}")


def model_signature():
    """Signature of the logged pipeline: a prompt string in, generated text out, generation params."""
    from mlflow.models import infer_signature

    return infer_signature([DEFAULT_EXAMPLE_PROMPT], ["generated text"], params=dict(GENERATION_PARAMS))


def render_model_card(
    model_name: str,
    *,
    log_mode: str,
    base_model_dir: str,
    metrics: dict[str, float],
    params: dict[str, Any],
    tags: dict[str, str],
    datasets: dict[str, dict[str, Any]],
    model_sha256: str,
) -> str:
    """The model card (Markdown with YAML front matter) naming data, config and scores."""
    import yaml

    front = {
        "library_name": "peft" if log_mode == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sft", "sft_pipeline", "lora" if log_mode == "adapter" else "merged"],
        "base_model": str(base_model_dir),
        "scores": {k: v for k, v in sorted(metrics.items())},
        "datasets_sha256": {split: info.get("sha256") for split, info in datasets.items()},
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {model_name}", ""]
    lines += [
        "Supervised fine-tune produced by `sft_pipeline` "
        f"({'PEFT adapter over a local base model' if log_mode == 'adapter' else 'adapter merged into the base weights'}).",
        "",
        f"- base model: `{base_model_dir}` (revision `{tags.get('base_model_revision', 'unknown')}`)",
        f"- model files sha256: `{model_sha256}`",
        f"- Dagster run: `{tags.get('dagster_run_id', 'n/a')}`",
        "",
        "## Data",
        "",
        "| split | rows | sha256 | path |",
        "|---|---|---|---|",
    ]
    for split, info in datasets.items():
        lines.append(f"| {split} | {info.get('rows', '')} | `{str(info.get('sha256', ''))[:16]}` | `{info.get('path', '')}` |")
    if not datasets:
        lines.append("| (not recorded) | | | |")
    lines += ["", "## Configuration", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | `{str(v)[:200]}` |" for k, v in sorted(params.items())]
    lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    gate = tags.get(TAG_GATE_PASSED)
    if gate is not None:
        lines += ["", "## Evaluation gate", "", f"- passed: **{gate}**", f"- {tags.get('gate_reasons', '')}"]
    versions = {k: v for k, v in tags.items() if k.startswith(("code_version.", "data_version."))}
    if versions:
        lines += ["", "## Lineage (Dagster)", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in sorted(versions.items())]
    lines += ["", "## Use", "", "```python", "import mlflow",
              f'model = mlflow.pyfunc.load_model("models:/{model_name}@champion")',
              'model.predict(["Give three tips for staying healthy."], params={"max_new_tokens": 64})', "```", ""]
    return "\n".join(lines)


def _dataset_inputs(datasets: dict[str, str | Path]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """mlflow.data datasets (one per split, digest = file sha256) and a plain summary of each."""
    import mlflow.data
    import pandas as pd

    objects, summary = {}, {}
    for split, path in (datasets or {}).items():
        path = Path(path)
        if not path.is_file():
            continue
        sha = file_sha256(path)
        frame = pd.read_parquet(path)
        objects[split] = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=split, digest=sha[:16])
        summary[split] = {"path": str(path.resolve()), "sha256": sha, "rows": len(frame)}
    return objects, summary


def _log_inputs_to_run(client, run_id: str | None, datasets: dict[str, Any], splits: tuple[str, ...]) -> None:
    """Attach the dataset inputs for `splits` to an existing (possibly finished) run."""
    if not run_id:
        return
    from mlflow.entities import DatasetInput, InputTag

    inputs = [
        DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=split)])
        for split, ds in datasets.items() if split in splits
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ------------------------------------------------------------------------------------------
# Idempotence


def find_version_by_tag(tracking_uri: str, model_name: str, key: str, value: str):
    """The newest version of `model_name` whose tag `key` equals `value`, or None."""
    client = _client(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{model_name}' and tags.`{key}` = '{value}'")
    except Exception:  # a backend without tag filters: filter here
        versions = [v for v in client.search_model_versions(f"name = '{model_name}'") if v.tags.get(key) == value]
    versions = [v for v in versions if v.tags.get(key) == value]
    return max(versions, key=lambda v: int(v.version)) if versions else None


def registration_key(model_sha256: str, lineage_key: str | None) -> str:
    """What makes two registrations 'the same model': the file hash and, when given, its lineage."""
    if not lineage_key:
        return model_sha256
    return hashlib.sha256(f"{model_sha256}|{lineage_key}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# Registration


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
    log_mode: str = "adapter",
    promotion_metric: str | None = None,
    higher_is_better: bool = True,
    gate_passed: bool = True,
    gate_reasons: list[str] | None = None,
    datasets: dict[str, str | Path] | None = None,
    evaluation_run_id: str | None = None,
    lineage_key: str | None = None,
    use_chat_template: bool = True,
) -> RegistrationInfo:
    """Log the fine-tuned model in a new MLflow run and register it as a version of `model_name`.

    - The run gets `params`, the finite `metrics`, `tags`, dataset inputs (`datasets`: split ->
      Parquet file, logged with ``mlflow.data`` and context = split), the model card as an
      artifact, and links to the training and evaluation runs (its parent is the training run).
    - The version gets `tags`, ``score.<metric>`` for every metric, the model hash, dataset
      hashes, and alias `alias` (every new version).
    - `promote_to` (e.g. "champion"): tried only when `gate_passed`; with `promotion_metric`, the
      version must beat the current holder on it (see `promote_if_better`); without one, it
      takes the alias unconditionally.
    - Registering the same model again (same file hash and `lineage_key`) creates nothing new:
      the existing version is returned with ``created=False`` (a pending promotion is retried).
    """
    adapter_dir, base_model_dir = Path(adapter_dir).resolve(), Path(base_model_dir).resolve()
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter_dir {adapter_dir} does not exist")
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"base_model_dir {base_model_dir} is not a Hugging Face model folder")
    if not model_name or not alias:
        raise ValueError("model_name and alias must be non-empty")
    if log_mode not in LOG_MODES:
        raise ValueError(f"log_mode must be one of {LOG_MODES}, got {log_mode!r}")

    client = _client(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    model_sha = hash_model_files(adapter_dir)
    key = registration_key(f"{model_sha}:{log_mode}", lineage_key)
    clean_metrics = _finite_metrics(metrics)

    existing = find_version_by_tag(tracking_uri, model_name, TAG_REGISTRATION_KEY, key)
    if existing is not None:
        return _reuse_existing(tracking_uri, client, existing, model_name, alias, exp_id, model_sha, log_mode,
                               promote_to, promotion_metric, higher_is_better, gate_passed, gate_reasons)

    dataset_objects, dataset_summary = _dataset_inputs(datasets or {})
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    str_tags[TAG_GATE_PASSED] = str(bool(gate_passed))
    if gate_reasons is not None:
        str_tags.setdefault("gate_reasons", "; ".join(gate_reasons) or "all gates passed")
    version_tags = {
        **str_tags,
        TAG_MODEL_SHA: model_sha,
        TAG_REGISTRATION_KEY: key,
        TAG_LOG_MODE: log_mode,
        **{f"{SCORE_PREFIX}{k}": repr(v) for k, v in clean_metrics.items()},
        **{f"dataset_sha256.{split}": info["sha256"] for split, info in dataset_summary.items()},
    }
    if training_run_id:
        version_tags["training_run_id"] = training_run_id
    if evaluation_run_id:
        version_tags["evaluation_run_id"] = evaluation_run_id

    model, tokenizer, is_peft = _load_for_logging(adapter_dir, base_model_dir)
    if log_mode == "merged" and is_peft:
        model = model.merge_and_unload()
    effective_mode = "adapter" if (is_peft and log_mode == "adapter") else "merged" if is_peft else "full"
    card_text = render_model_card(
        model_name, log_mode=effective_mode, base_model_dir=str(base_model_dir), metrics=clean_metrics,
        params=params or {}, tags=str_tags, datasets=dataset_summary, model_sha256=model_sha,
    )
    from huggingface_hub import ModelCard

    prompt_template = chat_prompt_template(tokenizer) if use_chat_template else None
    run_tags = {"sft_pipeline.stage": "registration", **str_tags, TAG_MODEL_SHA: model_sha}
    if training_run_id:
        run_tags["training_run_id"] = training_run_id
        run_tags["mlflow.parentRunId"] = training_run_id  # nested under the training run in the UI
    if evaluation_run_id:
        run_tags["evaluation_run_id"] = evaluation_run_id

    with _tracking(tracking_uri) as mlflow:
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as run:
            run_params = {k: str(v)[:6000] for k, v in (params or {}).items()}
            run_params.update(base_model_dir=str(base_model_dir), adapter_dir=str(adapter_dir), log_mode=effective_mode)
            mlflow.log_params(run_params, synchronous=True)
            if clean_metrics:
                mlflow.log_metrics(clean_metrics, synchronous=True)
            for split, ds in dataset_objects.items():
                mlflow.log_input(ds, context=split)
            mlflow.log_text(card_text, "model_card.md")
            log_kwargs: dict[str, Any] = {"base_model_path": str(base_model_dir)} if effective_mode == "adapter" else {}
            if prompt_template:
                log_kwargs["prompt_template"] = prompt_template
            model_info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name=MODEL_ARTIFACT_NAME,
                task="text-generation",
                signature=model_signature(),
                input_example=([DEFAULT_EXAMPLE_PROMPT], {"max_new_tokens": 16}),
                model_card=ModelCard(card_text),
                metadata={"model_sha256": model_sha, "log_mode": effective_mode, "base_model_path": str(base_model_dir)},
                pip_requirements=_pip_requirements(),
                **log_kwargs,
            )
        mv = mlflow.register_model(model_info.model_uri, model_name, tags=version_tags)

    version = int(mv.version)
    # Tag again through the client: register_model's tags are applied after creation, so this
    # also covers a backend that ignored them.
    for k, v in version_tags.items():
        client.set_model_version_tag(model_name, str(version), k, v)
    client.update_model_version(model_name, str(version), description=card_text[:4900])
    _link_runs(client, run.info.run_id, model_name, version, training_run_id, evaluation_run_id, dataset_objects)
    move_alias(tracking_uri, model_name, alias, version, reason="new version", run_id=run.info.run_id)
    promotion = None
    if promote_to:
        promotion = _decide_promotion(tracking_uri, model_name, version, promote_to, promotion_metric,
                                      higher_is_better, gate_passed, gate_reasons, run.info.run_id)
        client.set_tag(run.info.run_id, f"{PROMOTION_PREFIX}{promote_to}", "promoted" if promotion.promoted else "kept")
        client.set_tag(run.info.run_id, f"{PROMOTION_PREFIX}{promote_to}.reason", promotion.reason[:4900])
    aliases = sorted(client.get_model_version(model_name, str(version)).aliases)
    return RegistrationInfo(
        run_id=run.info.run_id,
        model_name=model_name,
        version=version,
        aliases=aliases,
        model_uri=f"models:/{model_name}/{version}",
        source_uri=model_info.model_uri,
        experiment_id=exp_id,
        created=True,
        model_sha256=model_sha,
        log_mode=effective_mode,
        promotion=promotion.to_dict() if promotion else None,
        dataset_digests={split: info["sha256"] for split, info in dataset_summary.items()},
    )


def _reuse_existing(tracking_uri, client, existing, model_name, alias, exp_id, model_sha, log_mode,
                    promote_to, promotion_metric, higher_is_better, gate_passed, gate_reasons) -> RegistrationInfo:
    """The same model was registered before: return that version, finishing a promotion left undone."""
    version = int(existing.version)
    existing = client.get_model_version(model_name, str(version))  # search results may omit aliases
    latest = max(int(v.version) for v in client.search_model_versions(f"name = '{model_name}'"))
    if version == latest and alias not in existing.aliases:
        move_alias(tracking_uri, model_name, alias, version, reason="re-registration of the same model", run_id=existing.run_id)
    promotion = None
    if promote_to:
        promotion = _decide_promotion(tracking_uri, model_name, version, promote_to, promotion_metric,
                                      higher_is_better, gate_passed, gate_reasons, existing.run_id)
    mv = client.get_model_version(model_name, str(version))
    return RegistrationInfo(
        run_id=existing.run_id or "",
        model_name=model_name,
        version=version,
        aliases=sorted(mv.aliases),
        model_uri=f"models:/{model_name}/{version}",
        source_uri=existing.source or "",
        experiment_id=exp_id,
        created=False,
        model_sha256=model_sha,
        log_mode=existing.tags.get(TAG_LOG_MODE, log_mode),
        promotion=promotion.to_dict() if promotion else None,
        dataset_digests={k[len("dataset_sha256."):]: v for k, v in existing.tags.items() if k.startswith("dataset_sha256.")},
    )


def _link_runs(client, registration_run_id, model_name, version, training_run_id, evaluation_run_id, dataset_objects) -> None:
    """Two-way links between the training, evaluation and registration runs, and dataset inputs on each."""
    link = {"sft_pipeline.registered_model": model_name, "sft_pipeline.registered_version": str(version),
            "sft_pipeline.registration_run_id": registration_run_id}
    for run_id, splits in ((training_run_id, ("train", "validation")), (evaluation_run_id, ("test",))):
        if not run_id:
            continue
        try:
            for k, v in link.items():
                client.set_tag(run_id, k, v)
            if run_id == evaluation_run_id and training_run_id and run_id != training_run_id:
                client.set_tag(run_id, "training_run_id", training_run_id)
                if "mlflow.parentRunId" not in client.get_run(run_id).data.tags:
                    client.set_tag(run_id, "mlflow.parentRunId", training_run_id)
            _log_inputs_to_run(client, run_id, dataset_objects, splits)
        except Exception as exc:  # a deleted or foreign run must not fail the registration
            client.set_tag(registration_run_id, f"sft_pipeline.link_error.{run_id[:8]}", str(exc)[:500])


# ------------------------------------------------------------------------------------------
# Aliases: history, compare-and-set promotion


@contextlib.contextmanager
def registry_lock(tracking_uri: str, model_name: str):
    """An exclusive OS file lock for alias moves of `model_name` in this store.

    Beside the DB for a SQLite store; in the temp folder (keyed by URI) for a tracking server,
    which serializes the processes of one machine. Works across threads too (each holder opens
    the file anew, and ``flock`` locks belong to the open file). Across machines, serialize the
    `registered_model` step instead (the Dagster pool ``registry``).
    """
    if tracking_uri.startswith("sqlite:///"):
        db = _sqlite_path(tracking_uri).resolve()
        lock_path = db.with_name(f"{db.name}.{_safe_name(model_name)}.lock")
    else:
        digest = hashlib.sha256(f"{tracking_uri}|{model_name}".encode()).hexdigest()[:16]
        lock_path = Path(tempfile.gettempdir()) / f"sft_pipeline-registry-{digest}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; the re-read after setting still guards
        fcntl = None
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _current_alias_version(client, model_name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(model_name, alias).version)
    except Exception:
        return None


def move_alias(tracking_uri: str, model_name: str, alias: str, version: int | str, *, reason: str, run_id: str | None = None) -> None:
    """Point `alias` at `version` and append the move to the alias history."""
    client = _client(tracking_uri)
    previous = _current_alias_version(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, str(version))
    _record_alias_move(client, model_name, alias, int(version), previous, reason, run_id)


def _record_alias_move(client, model_name, alias, version, previous, reason, run_id) -> None:
    entry = {"alias": alias, "version": int(version), "previous_version": previous, "reason": reason[:2000],
             "run_id": run_id, "timestamp_ms": int(time.time() * 1000)}
    key = f"{HISTORY_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(model_name, key, json.dumps(entry))


def alias_history(tracking_uri: str, model_name: str, alias: str | None = None) -> list[dict[str, Any]]:
    """Every alias move recorded for `model_name` (optionally one alias), oldest first.

    Each entry: alias, version, previous_version, reason, run_id, timestamp_ms.
    """
    tags = _client(tracking_uri).get_registered_model(model_name).tags
    entries = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(HISTORY_PREFIX)]
    return [e for e in entries if alias is None or e["alias"] == alias]


def _version_score(client, model_name: str, version: int, metric: str) -> float | None:
    mv = client.get_model_version(model_name, str(version))
    raw = mv.tags.get(f"{SCORE_PREFIX}{metric}")
    if raw is not None:
        try:
            return float(raw)
        except ValueError:
            return None
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return float(value) if value is not None else None
    return None


def _beats(score: float | None, other: float | None, higher_is_better: bool) -> bool:
    if score is None:
        return False
    if other is None:
        return True
    return score > other if higher_is_better else score < other


def promote_if_better(
    tracking_uri: str,
    model_name: str,
    version: int | str,
    *,
    alias: str = "champion",
    metric: str | None = None,
    higher_is_better: bool = True,
    gate_passed: bool = True,
    gate_reasons: list[str] | None = None,
    run_id: str | None = None,
    max_attempts: int = 3,
) -> PromotionDecision:
    """Compare-and-set: move `alias` to `version` only if the gate passed and it beats the holder.

    Beating means a strictly better `metric` (a ``score.<metric>`` version tag, else the run's
    metric); a holder without a score is beaten by any scored version; with `metric` None the
    gate alone decides. Under `registry_lock` the holder is read, compared, the alias set and
    read back; if another writer moved it in between, the comparison is redone (at most
    `max_attempts` times). The decision and its reason are tagged on the version
    (``sft_pipeline.promotion.<alias>``, ``...reason``) and every move lands in the alias history.
    """
    return _decide_promotion(tracking_uri, model_name, int(version), alias, metric, higher_is_better,
                             gate_passed, gate_reasons, run_id, max_attempts=max_attempts)


def _decide_promotion(tracking_uri, model_name, version, alias, metric, higher_is_better, gate_passed,
                      gate_reasons, run_id, max_attempts: int = 3) -> PromotionDecision:
    client = _client(tracking_uri)
    version = int(version)
    score = _version_score(client, model_name, version, metric) if metric else None
    decision: PromotionDecision | None = None
    if not gate_passed:
        reasons = "; ".join(gate_reasons or []) or "the evaluation gate did not pass"
        decision = PromotionDecision(alias, version, False, f"gate failed: {reasons}", metric=metric, score=score,
                                     previous_version=_current_alias_version(client, model_name, alias))
    elif metric and score is None:
        decision = PromotionDecision(alias, version, False, f"version {version} has no score for {metric!r}",
                                     metric=metric, previous_version=_current_alias_version(client, model_name, alias))
    attempt = 0
    while decision is None:
        attempt += 1
        with registry_lock(tracking_uri, model_name):
            holder = _current_alias_version(client, model_name, alias)
            holder_score = _version_score(client, model_name, holder, metric) if (metric and holder is not None) else None
            if holder == version:
                decision = PromotionDecision(alias, version, True, f"version {version} already holds {alias!r}",
                                             previous_version=holder, metric=metric, score=score, previous_score=holder_score)
                break
            if metric and holder is not None and not _beats(score, holder_score, higher_is_better):
                direction = "higher" if higher_is_better else "lower"
                decision = PromotionDecision(
                    alias, version, False,
                    f"{metric} {score:.6g} does not beat {alias} version {holder} ({holder_score}); {direction} is better",
                    previous_version=holder, metric=metric, score=score, previous_score=holder_score)
                break
            client.set_registered_model_alias(model_name, alias, str(version))
            now_holder = _current_alias_version(client, model_name, alias)
            if now_holder == version:
                if holder is None:
                    why = f"gate passed; first {alias}"
                elif metric:
                    why = f"gate passed; {metric} {score:.6g} beats version {holder} ({holder_score})"
                else:
                    why = "gate passed (no comparison metric configured)"
                _record_alias_move(client, model_name, alias, version, holder, why, run_id)
                decision = PromotionDecision(alias, version, True, why, previous_version=holder, metric=metric,
                                             score=score, previous_score=holder_score)
                break
        if attempt >= max_attempts:  # someone outside the lock keeps moving it: give up, say so
            decision = PromotionDecision(alias, version, False,
                                         f"{alias} was moved concurrently {attempt} times; left at version {now_holder}",
                                         previous_version=now_holder, metric=metric, score=score)
    client.set_model_version_tag(model_name, str(version), f"{PROMOTION_PREFIX}{alias}", "promoted" if decision.promoted else "kept")
    client.set_model_version_tag(model_name, str(version), f"{PROMOTION_PREFIX}{alias}.reason", decision.reason[:4900])
    return decision


# ------------------------------------------------------------------------------------------
# Reading back


def get_model_version_by_alias(tracking_uri: str, model_name: str, alias: str):
    """The `mlflow.entities.model_registry.ModelVersion` that `alias` points to (raises if none)."""
    return _client(tracking_uri).get_model_version_by_alias(model_name, alias)


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int | str, reason: str = "set by hand") -> None:
    """Point `alias` at `version` unconditionally (an operator's rollback); recorded in the alias history."""
    with registry_lock(tracking_uri, model_name):
        move_alias(tracking_uri, model_name, alias, version, reason=reason)


def load_registered_model(tracking_uri: str, model_uri: str, flavor: str = "pyfunc", **kwargs):
    """Load ``models:/<name>@<alias>`` (or any model URI) from this store without touching global MLflow state.

    flavor: "pyfunc" (``predict([...], params={...})``) or "transformers" (a pipeline, or
    components with ``return_type="components"``).
    """
    with _tracking(tracking_uri) as mlflow:
        if flavor == "pyfunc":
            return mlflow.pyfunc.load_model(model_uri, **kwargs)
        if flavor == "transformers":
            return mlflow.transformers.load_model(model_uri, **kwargs)
        raise ValueError(f"flavor must be 'pyfunc' or 'transformers', got {flavor!r}")
