"""Registering a model version: log it in a new run, tag it, and return the existing version for the same model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.hashing import model_digest, text_digest
from sft_pipeline.registry.aliases import _decide_promotion, move_alias
from sft_pipeline.registry.card import DESCRIPTION_MAX_CHARS, card_front_matter, render_model_card, render_readme
from sft_pipeline.registry.lineage import _dataset_inputs, _link_runs
from sft_pipeline.registry.log import LOG_MODES, chat_prompt_template, load_model_for_logging, log_model
from sft_pipeline.registry.tags import (
    DATASET_SHA_PREFIX,
    PROMOTION_PREFIX,
    SCORE_PREFIX,
    TAG_GATE_PASSED,
    TAG_LOG_MODE,
    TAG_MODEL_SHA,
    TAG_REGISTRATION_KEY,
)
from sft_pipeline.tracking import client as _client  # `client` is the local name for the instance below
from sft_pipeline.tracking import configure, use_tracking_uri


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



def _finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}



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
    return text_digest(f"{model_sha256}|{lineage_key}")


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
    evaluation: dict[str, Any] | None = None,
) -> RegistrationInfo:
    """Log the fine-tuned model in a new MLflow run and register it as a version of `model_name`.

    - The run gets `params`, the finite `metrics`, `tags`, dataset inputs (`datasets`: split ->
      Parquet file, logged with ``mlflow.data`` and context = split), the model card as an
      artifact, and links to the training and evaluation runs (its parent is the training run).
    - The version gets `tags`, ``score.<metric>`` for every metric, the model hash, dataset
      hashes, and alias `alias` (every new version); its description is the model card in plain
      Markdown (`card.render_model_card`, fitted to MLflow's limit), with the base-vs-tuned table and the
      gate's numbers when `evaluation` ({"rows", "gate"}, `candidate.evaluation_report`) is given. The
      logged model's card is the same text; its Hugging Face front matter goes to `model_card_data.yaml`.
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
    exp_id = configure(tracking_uri, experiment)
    model_sha = model_digest(adapter_dir)
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
        **{f"{DATASET_SHA_PREFIX}{split}": info["sha256"] for split, info in dataset_summary.items()},
    }
    if training_run_id:
        version_tags["training_run_id"] = training_run_id
    if evaluation_run_id:
        version_tags["evaluation_run_id"] = evaluation_run_id

    model, tokenizer, effective_mode = load_model_for_logging(adapter_dir, base_model_dir, log_mode)
    card_args = dict(log_mode=effective_mode, base_model_dir=str(base_model_dir), metrics=clean_metrics, params=params or {},
                     tags=version_tags, datasets=dataset_summary, model_sha256=model_sha, evaluation=evaluation)
    card_text = render_model_card(model_name, **card_args)
    description = render_model_card(model_name, **card_args, max_chars=DESCRIPTION_MAX_CHARS)
    readme_text = render_readme(card_text, card_front_matter(log_mode=effective_mode, base_model_dir=str(base_model_dir),
                                                             metrics=clean_metrics, datasets=dataset_summary))
    prompt_template = chat_prompt_template(tokenizer) if use_chat_template else None
    run_tags = {"sft_pipeline.stage": "registration", **str_tags, TAG_MODEL_SHA: model_sha}
    if training_run_id:
        run_tags["training_run_id"] = training_run_id
        run_tags["mlflow.parentRunId"] = training_run_id  # nested under the training run in the UI
    if evaluation_run_id:
        run_tags["evaluation_run_id"] = evaluation_run_id

    with use_tracking_uri(tracking_uri) as mlflow:
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as run:
            run_params = {k: str(v)[:6000] for k, v in (params or {}).items()}
            run_params.update(base_model_dir=str(base_model_dir), adapter_dir=str(adapter_dir), log_mode=effective_mode)
            mlflow.log_params(run_params, synchronous=True)
            if clean_metrics:
                mlflow.log_metrics(clean_metrics, synchronous=True)
            for split, ds in dataset_objects.items():
                mlflow.log_input(ds, context=split)
            mlflow.log_text(card_text, "model_card.md")
            model_info = log_model(mlflow, model, tokenizer, effective_mode=effective_mode, base_model_dir=base_model_dir,
                                   card_text=readme_text, model_sha256=model_sha, prompt_template=prompt_template)
        mv = mlflow.register_model(model_info.model_uri, model_name, tags=version_tags)

    version = int(mv.version)
    # Tag again through the client: register_model's tags are applied after creation, so this
    # also covers a backend that ignored them.
    for k, v in version_tags.items():
        client.set_model_version_tag(model_name, str(version), k, v)
    client.update_model_version(model_name, str(version), description=description)
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
        dataset_digests={k[len(DATASET_SHA_PREFIX):]: v for k, v in existing.tags.items() if k.startswith(DATASET_SHA_PREFIX)},
    )
