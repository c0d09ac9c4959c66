"""The registered model in memory (adapter on base, as MLflow loads it) and the merged Hugging Face folder.

The merged folder is what `AutoModelForCausalLM.from_pretrained(folder)`, `vllm serve folder` and llama.cpp's
converter take: `model.safetensors` (the adapter merged into the base weights), the tokenizer with its chat
template, `generation_config.json`, and a model card `README.md`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sft_pipeline.export.champion import LoggedModel

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def logged_dtype(logged: LoggedModel):
    """The dtype the version was logged (and is served) in; float32 when not recorded."""
    import torch

    name = str(logged.flavor.get("torch_dtype") or "torch.float32").removeprefix("torch.")
    return getattr(torch, name, torch.float32)


def load_tokenizer(logged: LoggedModel) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(logged.tokenizer_dir))


def load_registered_model(logged: LoggedModel) -> Any:
    """The version as MLflow's transformers flavor loads it: the PEFT adapter (unmerged) over the local base
    folder in the logged dtype, or the logged full weights; in eval mode on the CPU."""
    from sft_pipeline.modeling import load_causal_lm

    if logged.adapter_dir is not None:
        return load_causal_lm(logged.base_model_dir, logged.adapter_dir, dtype=logged_dtype(logged), merge_adapter=False)
    return load_causal_lm(logged.model_dir, dtype=logged_dtype(logged))


def merged_model(logged: LoggedModel) -> Any:
    """A fresh copy of the version with the adapter merged into the base weights (`merge_and_unload`)."""
    from sft_pipeline.modeling import load_causal_lm

    if logged.adapter_dir is None:
        return load_causal_lm(logged.model_dir, dtype=logged_dtype(logged))
    model = load_causal_lm(logged.base_model_dir, logged.adapter_dir, dtype=logged_dtype(logged), merge_adapter=False)
    return model.merge_and_unload()


def write_merged(logged: LoggedModel, out_dir: str | Path) -> list[str]:
    """Save the merged model, tokenizer, chat template and generation config into `out_dir`; returns the file
    names (relative to `out_dir`). The model card is written separately, once the figures are known."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = merged_model(logged)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = load_tokenizer(logged)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / CHAT_TEMPLATE_FILE).is_file():
        # A tokenizer saved without a template file (older layouts keep it in tokenizer_config.json) still
        # ships one where the base folder has it.
        for folder in (logged.tokenizer_dir, logged.base_model_dir):
            if folder is not None and (Path(folder) / CHAT_TEMPLATE_FILE).is_file():
                shutil.copyfile(Path(folder) / CHAT_TEMPLATE_FILE, out_dir / CHAT_TEMPLATE_FILE)
                break
    if not (out_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(str(out_dir))
    del model
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())


def load_merged(folder: str | Path, logged: LoggedModel) -> Any:
    """The merged folder loaded back from disk the standard way, in the logged dtype."""
    from sft_pipeline.modeling import load_causal_lm

    return load_causal_lm(folder, dtype=logged_dtype(logged))
