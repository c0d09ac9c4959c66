"""Method setup: freezing trains only the last blocks; LoRA on the last blocks; QLoRA on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sft_pipeline.training import train
from tests.unit.training.helpers import make_cfg


def test_freeze_trains_only_the_last_layers(tiny_model_dir, tiny_dataset_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="freeze", freeze_trainable_layers=1,
                   max_steps=3, warmup_ratio=0.0, weight_decay=0.0))
    assert r.model_dir and r.adapter_dir is None
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(Path(r.model_dir) / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed
    assert not any(k.startswith(("model.layers.0.", "model.embed_tokens")) for k in changed)
    assert 0 < r.trainable_parameters < r.total_parameters


def _adapted_blocks(tiny_model_dir, **cfg) -> set[str]:
    """The transformer blocks that carry LoRA weights when the model is set up with `cfg`."""
    from transformers import AutoModelForCausalLM

    from sft_pipeline.training import TrainingConfig
    from sft_pipeline.training.model import lora_targets
    from peft import LoraConfig, get_peft_model

    config = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir="d", output_dir="o", **cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **lora_targets(model, config)))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names, "no LoRA weights at all"
    return {n.split(".layers.")[1].split(".")[0] for n in names}


def test_lora_last_layers_adapts_only_the_upper_blocks(tiny_model_dir):
    assert _adapted_blocks(tiny_model_dir, lora_last_layers=1) == {"1"}
    assert _adapted_blocks(tiny_model_dir, lora_last_layers=0) == {"0", "1"}
    # more blocks than the model has: every block, as with a slice
    assert _adapted_blocks(tiny_model_dir, lora_last_layers=10) == {"0", "1"}
    # named modules are kept, only on the last block
    assert _adapted_blocks(tiny_model_dir, lora_last_layers=1, lora_target_modules=["q_proj"]) == {"1"}


def test_lora_last_layers_all_linear_means_every_linear_layer_of_a_block(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sft_pipeline.training import TrainingConfig
    from sft_pipeline.training.model import lora_targets

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    targets = lora_targets(model, TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", lora_last_layers=1))
    assert targets["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert targets["layers_to_transform"] == [1]
    assert lora_targets(model, TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", lora_last_layers=0)) \
        == {"target_modules": "all-linear"}


def test_lora_on_the_last_block_trains_only_that_block(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from safetensors.torch import load_file

    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, lora_last_layers=1, max_steps=2))
    keys = load_file(str(Path(r.adapter_dir) / "adapter_model.safetensors")).keys()
    assert keys and all(".layers.1." in k for k in keys), sorted(keys)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_gpu(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="qlora", max_steps=2))
    assert r.adapter_dir and math.isfinite(r.train_loss) and r.mfu is None or r.mfu >= 0
