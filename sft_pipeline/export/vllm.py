"""The LoRA adapter in the layout vLLM loads: `vllm serve <base> --enable-lora --lora-modules <name>=<folder>`.

What vLLM requires of a PEFT LoRA folder (its `PEFTHelper` and LoRA model loader):

* `adapter_config.json` with `r`, `lora_alpha` and `target_modules`; `bias: "none"`; no `modules_to_save`
  (vLLM only supports it being None); no DoRA (`use_dora`); no `trainable_token_indices`;
* the rank (and every `rank_pattern` rank) at most `--max-lora-rank` (16 unless raised: 8, 16, 32, 64, 128, 256);
* the weights in `adapter_model.safetensors` (or `.bin`), named the way PEFT saves them,
  `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, on linear projections of the decoder
  (vLLM packs `q/k/v_proj` into `qkv_proj` and `gate/up_proj` into `gate_up_proj` itself); LoRA on
  `embed_tokens` / `lm_head` is not loaded by current vLLM;
* the base model named by `vllm serve`; `base_model_name_or_path` in the config is informational for vLLM,
  and is set to the same name here so PEFT finds the base too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def adapter_ranks(config: dict[str, Any]) -> list[int]:
    return [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]


def required_max_lora_rank(config: dict[str, Any]) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds this adapter's largest rank."""
    rank = max(adapter_ranks(config))
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)


def vllm_problems(config: dict[str, Any], tensor_names: Iterable[str]) -> list[str]:
    """Why vLLM would refuse this adapter (empty when it loads)."""
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    for name in ("r", "lora_alpha", "target_modules"):
        if config.get(name) in (None, "", []):
            problems.append(f"adapter_config.json lacks {name}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}: vLLM supports only 'none'")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is {config['modules_to_save']}: vLLM only supports it being None")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices: new token embeddings are not served by vLLM's LoRA loader")
    raw_targets = config.get("target_modules") or []
    targets = [raw_targets] if isinstance(raw_targets, str) else list(raw_targets)
    bad_targets = sorted(t for t in targets if t.split(".")[-1] in UNSUPPORTED_TARGETS)
    if bad_targets:
        problems.append(f"LoRA on {', '.join(bad_targets)}: vLLM loads LoRA on the decoder's linear projections only")
    names = list(tensor_names)
    if not names:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    for name in names:
        if not name.startswith("base_model.model.") or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            problems.append(f"tensor {name!r} is not a PEFT LoRA weight (base_model.model.<module>.lora_A/B.weight)")
            break
        module = name[len("base_model.model."):].rsplit(".lora_", 1)[0]
        # A string target_modules is a regular expression (or "all-linear"): module names are not listed.
        if not isinstance(raw_targets, str) and targets and not any(module == t or module.endswith("." + t) for t in targets):
            problems.append(f"tensor {name!r} is on a module that target_modules does not name")
            break
    return problems


def read_adapter_tensors(folder: str | Path) -> dict[str, Any]:
    """The adapter's tensors by name, from safetensors (or a PyTorch .bin)."""
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / ADAPTER_WEIGHTS))
    if (folder / "adapter_model.bin").is_file():
        import torch

        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds no adapter_model.safetensors or adapter_model.bin")


def write_vllm_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str,
                       chat_template_from: str | Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """Write the adapter into `out_dir` as vLLM loads it; returns (file names, facts for the card and metadata).

    Raises ValueError naming every reason vLLM would refuse it (see `vllm_problems`).
    """
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = read_adapter_tensors(adapter_dir)
    problems = vllm_problems(config, tensors)
    if problems:
        raise ValueError("the adapter cannot be served by vLLM: " + "; ".join(problems))
    config["base_model_name_or_path"] = base_model
    config["inference_mode"] = True
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        shutil.copyfile(adapter_dir / ADAPTER_WEIGHTS, out_dir / ADAPTER_WEIGHTS)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    if chat_template_from is not None and Path(chat_template_from).is_file():
        shutil.copyfile(chat_template_from, out_dir / "chat_template.jinja")
        files.append("chat_template.jinja")
    targets = config.get("target_modules")
    # PEFT records "all-linear" as every matched module's full path; vLLM matches the last name part.
    names = sorted({t.split(".")[-1] for t in targets}) if isinstance(targets, list) else targets
    facts = {"base_model": base_model, "r": int(config.get("r") or 0), "lora_alpha": config.get("lora_alpha"),
             "target_modules": names,
             "tensors": len(tensors), "max_lora_rank": required_max_lora_rank(config)}
    return files, facts


def vllm_serve_command(model: str, adapter_name: str | None = None, adapter_path: str | Path | None = None,
                       max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK, chat_template: str | Path | None = None) -> str:
    """The `vllm serve` line for `model` (a merged folder or a base model), with the adapter as `adapter_name`
    when one is given."""
    parts = ["vllm serve", _quote(str(model))]
    if adapter_path is not None:
        parts += ["--enable-lora", f"--lora-modules {adapter_name}={_quote(str(adapter_path))}"]
    if max_lora_rank > VLLM_DEFAULT_MAX_LORA_RANK:
        parts.append(f"--max-lora-rank {max_lora_rank}")
    if chat_template:
        parts.append(f"--chat-template {_quote(str(chat_template))}")
    return " ".join(parts)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
