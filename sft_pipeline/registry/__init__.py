"""MLflow logging and model registry: log a fine-tuned model, register a version, move aliases.

Plain domain package: no Dagster import, and mlflow is imported inside the functions.

Modules
-------
* ``register``: `register_model` -> `RegistrationInfo`, idempotence by model digest.
* ``candidate``: `register_candidate`, the same from the training and evaluation hand-offs.
* ``log``: the logged model (transformers flavor, signature, input example, pip requirements).
* ``card``: the model card text.
* ``lineage``: dataset inputs and the links between training, evaluation and registration runs.
* ``aliases``: gated compare-and-set promotion, manual moves, alias history.
* ``load``: loading a registered model back.
* ``tags``: the tag names written on versions, runs and registered models.

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

  When the tokenizer has a chat template, the model is logged with MLflow's ``llm/v1/chat`` task:
  ``predict({"messages": [...]})`` (and ``mlflow models serve``) take OpenAI-style chat requests and
  return chat completions; without one it is a text-generation model taking plain strings.

* **Idempotent.** The model folder is hashed (``sft_pipeline.hashing.model_digest``, the identity
  training records); the version is tagged with that digest and with a registration key (the hash plus the caller's ``lineage_key``, e.g. the training run).
  Registering the same model again returns the existing version instead of a new one.

* **Gated, compare-and-set promotion.** ``candidate`` goes to every new version. ``champion``
  (``promote_to``) moves only when the caller says the gate passed and, with a
  ``promotion_metric``, only when the version *beats* the current champion on it. The decision
  and its reason are tagged on the version. The read-compare-set runs under a file lock (beside
  the SQLite store, or in the temp folder for a tracking server) and re-reads the alias after
  setting it, so two concurrent registrations cannot both take ``champion``.

* **Alias history.** Every alias move made through this package is recorded as a tag of the
  registered model (``sft_pipeline.alias_history.<time>-<id>``: JSON with alias, version,
  previous version, reason, run); ``alias_history(tracking_uri, name)`` returns them in order.
"""

from __future__ import annotations

from sft_pipeline.registry.aliases import (
    PromotionDecision,
    alias_history,
    get_model_version_by_alias,
    move_alias,
    promote_if_better,
    registry_lock,
    set_alias,
)
from sft_pipeline.registry.card import render_model_card
from sft_pipeline.registry.load import load_registered_model
from sft_pipeline.registry.log import (
    DEFAULT_EXAMPLE_PROMPT,
    GENERATION_PARAMS,
    LOG_MODES,
    MODEL_ARTIFACT_NAME,
    chat_prompt_template,
    model_signature,
)
from sft_pipeline.registry.register import RegistrationInfo, find_version_by_tag, register_model, registration_key
from sft_pipeline.registry.tags import (
    HISTORY_PREFIX,
    PROMOTION_PREFIX,
    SCORE_PREFIX,
    TAG_GATE_PASSED,
    TAG_LOG_MODE,
    TAG_MODEL_SHA,
    TAG_REGISTRATION_KEY,
)

__all__ = [
    "DEFAULT_EXAMPLE_PROMPT",
    "GENERATION_PARAMS",
    "HISTORY_PREFIX",
    "LOG_MODES",
    "MODEL_ARTIFACT_NAME",
    "PROMOTION_PREFIX",
    "PromotionDecision",
    "RegistrationInfo",
    "SCORE_PREFIX",
    "TAG_GATE_PASSED",
    "TAG_LOG_MODE",
    "TAG_MODEL_SHA",
    "TAG_REGISTRATION_KEY",
    "alias_history",
    "chat_prompt_template",
    "find_version_by_tag",
    "get_model_version_by_alias",
    "load_registered_model",
    "model_signature",
    "move_alias",
    "promote_if_better",
    "register_model",
    "registration_key",
    "registry_lock",
    "render_model_card",
    "set_alias",
]
