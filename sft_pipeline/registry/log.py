"""Logging the fine-tuned model to an MLflow run: transformers flavor, task, signature, input example, requirements.

A model whose tokenizer has a chat template (every model this pipeline trains: the base model gets a default
one when it has none) is logged with MLflow's `llm/v1/chat` task, so `mlflow models serve -m
models:/<name>@champion` answers OpenAI-style chat requests on `/invocations`:

    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64, "temperature": 0}
    -> [{"id": ..., "object": "chat.completion", "created": ..., "model": ...,
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": ..., "completion_tokens": ..., "total_tokens": ...}}]

MLflow applies the tokenizer's chat template to the messages and decodes greedily by default (`SERVING_CONFIG`);
a request's `max_tokens` overrides `max_new_tokens`. `pyfunc` `predict()` takes the same chat requests (a dict,
or a list of them) and returns those dicts. A model logged without a chat template (`use_chat_template=False`,
or a tokenizer without one) keeps the plain `text-generation` task: a prompt string in, generated text out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_ARTIFACT_NAME = "model"
LOG_MODES = ("adapter", "merged")
DEFAULT_EXAMPLE_PROMPT = "Give three tips for staying healthy."
GENERATION_PARAMS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
CHAT_TASK = "llm/v1/chat"
TEXT_TASK = "text-generation"
# Inference defaults of a chat-task model (MLflow's `model_config`): greedy, at most 64 new tokens.
SERVING_CONFIG = {"max_new_tokens": 64, "do_sample": False}
CHAT_INPUT_EXAMPLE = {"messages": [{"role": "user", "content": DEFAULT_EXAMPLE_PROMPT}], "max_tokens": 16}


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
    from transformers import AutoTokenizer

    from sft_pipeline.modeling import load_causal_lm

    is_peft = (weights_dir / "adapter_config.json").is_file()
    tok_dir = weights_dir if (weights_dir / "tokenizer_config.json").is_file() else base_model_dir
    # The tokenizer is logged as saved: its padding settings are the model's, not scoring's.
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if is_peft:
        model = load_causal_lm(base_model_dir, weights_dir, merge_adapter=False)
    elif (weights_dir / "config.json").is_file():
        model = load_causal_lm(weights_dir)
    else:
        raise FileNotFoundError(f"{weights_dir} holds neither a PEFT adapter nor a Hugging Face model")
    return model, tokenizer, is_peft


def load_model_for_logging(weights_dir: Path, base_model_dir: Path, log_mode: str):
    """Return (model, tokenizer, effective_mode): the adapter merged when `log_mode` is "merged".

    effective_mode is "adapter" (PEFT adapter over the base), "merged" (adapter merged into the
    base weights) or "full" (training saved full weights, no adapter).
    """
    model, tokenizer, is_peft = _load_for_logging(weights_dir, base_model_dir)
    if log_mode == "merged" and is_peft:
        model = model.merge_and_unload()
    effective_mode = "adapter" if (is_peft and log_mode == "adapter") else "merged" if is_peft else "full"
    return model, tokenizer, effective_mode


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


def serving_task(tokenizer, prompt_template: str | None) -> str:
    """`llm/v1/chat` when the model is meant to be prompted through its chat template (a prompt template was
    made from it and the tokenizer has one), else `text-generation`."""
    return CHAT_TASK if prompt_template and getattr(tokenizer, "chat_template", None) else TEXT_TASK


def log_model(mlflow, model, tokenizer, *, effective_mode: str, base_model_dir: Path, card_text: str,
              model_sha256: str, prompt_template: str | None, task: str | None = None):
    """Log `model` and `tokenizer` into the active run of `mlflow` (the module, already pointed at the
    store) as the transformers flavor; returns MLflow's ModelInfo.

    `task` (default `serving_task`): `llm/v1/chat` logs an OpenAI-style chat model (MLflow sets the chat
    signature, the chat template formats the messages, `SERVING_CONFIG` are the inference defaults);
    `text-generation` logs the string-in, string-out signature with `prompt_template`.
    In "adapter" mode only the adapter is stored and the local base folder is recorded
    (``base_model_path``), so a version costs megabytes but needs that folder where it is loaded.
    """
    from huggingface_hub import ModelCard

    task = task or serving_task(tokenizer, prompt_template)
    if task not in (CHAT_TASK, TEXT_TASK):
        raise ValueError(f"task must be {CHAT_TASK!r} or {TEXT_TASK!r}, got {task!r}")
    log_kwargs: dict[str, Any] = {"base_model_path": str(base_model_dir)} if effective_mode == "adapter" else {}
    if task == CHAT_TASK:
        log_kwargs.update(model_config=dict(SERVING_CONFIG), input_example=CHAT_INPUT_EXAMPLE)
    else:
        log_kwargs.update(signature=model_signature(), input_example=([DEFAULT_EXAMPLE_PROMPT], {"max_new_tokens": 16}))
        if prompt_template:
            log_kwargs["prompt_template"] = prompt_template
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name=MODEL_ARTIFACT_NAME,
        task=task,
        model_card=ModelCard(card_text),
        metadata={"model_sha256": model_sha256, "log_mode": effective_mode, "base_model_path": str(base_model_dir),
                  "serving_task": task},
        pip_requirements=_pip_requirements(),
        **log_kwargs,
    )
