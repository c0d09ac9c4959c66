"""Method setup: freezing trains only the last blocks; QLoRA on a GPU."""

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


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_gpu(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="qlora", max_steps=2))
    assert r.adapter_dir and math.isfinite(r.train_loss) and r.mfu is None or r.mfu >= 0
