"""The CPU LM head: scoring only labeled positions gives the full-logits loss, log-probabilities, entropy and gradient."""

from __future__ import annotations

import pytest

from sft_pipeline.training import build_trainer
from tests.unit.training.helpers import make_cfg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU head (on CUDA TRL's own is compact)")
def test_compact_head_matches_full_logits(tiny_model_dir, tiny_dataset_dir, tmp_path):
    import torch

    trainer, _, _ = build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, lora_dropout=0.0,
                                           batching="padded", max_batch_tokens=0))
    model = trainer.model.train()
    assert model.get_base_model().forward.__func__.__code__.co_filename.endswith("loss.py")  # ours, not TRL's
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    assert (labels == -100).float().mean() > 0.3  # prompts and pads carry no label: the case that matters

    fused = model(**batch, fused_lm_head=True)
    assert not hasattr(fused, "logits") or fused.get("logits") is None
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    plain.loss.backward()
    assert torch.isclose(fused.loss, plain.loss, rtol=1e-5)
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-7), name

    logits = plain.logits[:, :-1].detach().float()
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    log_softmax = logits.log_softmax(-1)
    expected = log_softmax.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(fused.log_probs.detach(), expected, atol=1e-5)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1) * mask
    assert torch.allclose(fused.entropy.detach(), entropy, atol=1e-4)
    assert torch.equal(fused.is_top1, (logits.argmax(-1) == target) & mask)
    assert torch.equal(fused.label_mask, mask)


def test_generation_forward_is_untouched(tiny_model_dir, tiny_dataset_dir, tmp_path):
    import torch

    trainer, _, _ = build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path))
    model = trainer.model.eval()
    ids = torch.tensor([[1, 5, 7, 9]], device=model.device)
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.logits.shape[:2] == (1, 4)
