"""Loading the base model for training and setting up the method: LoRA / QLoRA adapters, layer freezing, full."""

from __future__ import annotations

from typing import Any

from sft_pipeline.training.config import TrainingConfig
from sft_pipeline.training.device import resolve_attn_implementation


def _decoder_blocks(model):
    """(the ModuleList of transformer blocks, the module holding it) of a causal LM."""
    import torch.nn as nn

    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks, base
    lists = [(len(m), parent) for parent in model.modules() for m in parent.children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("could not find the model's list of transformer blocks (needed by method 'freeze' and "
                         "lora_last_layers)")
    _, parent = max(lists, key=lambda x: x[0])
    blocks = next(m for m in parent.children() if isinstance(m, nn.ModuleList))
    return blocks, parent


def freeze_all_but_last_layers(model, n: int) -> list[str]:
    """Freeze every parameter, then unfreeze the last `n` transformer blocks and the final norm.

    Returns the names of the trainable parameters.
    """
    blocks, holder = _decoder_blocks(model)
    if n > len(blocks):
        raise ValueError(f"TrainingConfig.freeze_trainable_layers: the model has only {len(blocks)} "
                         f"transformer blocks (got {n})")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[-n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        norm = getattr(holder, name, None)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
            break
    return [name for name, p in model.named_parameters() if p.requires_grad]


def lora_targets(model, cfg: TrainingConfig) -> dict[str, Any]:
    """LoraConfig's target_modules (and layers_to_transform with `lora_last_layers`) for `model`.

    peft takes a layer subset only with named modules, so 'all-linear' becomes the names of the linear
    layers inside the transformer blocks (the LM head is outside them, as with peft's 'all-linear').
    """
    import torch.nn as nn

    if not cfg.lora_last_layers:
        return {"target_modules": cfg.lora_target_modules}
    blocks, _ = _decoder_blocks(model)
    first = max(0, len(blocks) - cfg.lora_last_layers)  # a model with fewer blocks gets every block adapted
    targets = cfg.lora_target_modules
    if targets == "all-linear":
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in blocks.named_modules()
                          if isinstance(module, nn.Linear)})
    return {"target_modules": targets,
            "layers_to_transform": list(range(first, len(blocks)))}


def load_model(cfg: TrainingConfig, bf16: bool):
    """The model to train: base weights (4-bit NF4 for qlora), then LoRA adapters or layer freezing."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": resolve_attn_implementation(cfg)}
    if cfg.method == "qlora":
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        )
        kwargs["device_map"] = {"": PartialState().local_process_index}
        kwargs["dtype"] = torch.bfloat16
    else:
        # LoRA keeps the frozen base in bf16 to halve memory; full/freeze keep fp32 master weights
        # and let autocast do bf16 math.
        kwargs["dtype"] = torch.bfloat16 if (bf16 and cfg.method == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, **kwargs)

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, bias="none", **lora_targets(model, cfg))
        model = get_peft_model(model, lora)
    elif cfg.method == "freeze":
        freeze_all_but_last_layers(model, cfg.freeze_trainable_layers)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); 4-bit bitsandbytes weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
