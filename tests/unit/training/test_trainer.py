"""Training on the tiny model: LoRA/full runs, label masking, batching modes, early stopping, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sft_pipeline.training import build_trainer, train
from tests.unit.training.helpers import make_cfg, write_tiny_sft_dataset


@pytest.fixture(scope="module")
def lora_result(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    return train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path_factory.mktemp("lora_run")))


def test_lora_training_produces_adapter_and_history(lora_result):
    r = lora_result
    assert math.isfinite(r.train_loss) and r.train_loss > 0
    assert r.eval_loss is not None and math.isfinite(r.eval_loss)
    adapter = Path(r.adapter_dir)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()  # the folder loads on its own
    assert r.model_dir is None
    steps = [h["step"] for h in r.history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5]  # logging_steps=1: one loss per optimizer step
    assert all("learning_rate" in h for h in r.history if "loss" in h)
    assert [h["step"] for h in r.history if "eval_loss" in h] == [2, 4, 5]  # every eval_steps + final
    assert 0 < r.trainable_parameters < r.total_parameters
    assert r.global_step == 5
    assert r.tokens_seen > 0 and r.tokens_per_second > 0
    assert r.mlflow_run_id is None

    record = json.loads((Path(r.output_dir) / "training_record.json").read_text())
    assert record["train_loss"] == r.train_loss
    assert record["config"]["method"] == "lora"


def test_tokens_seen_counts_non_pad_tokens(lora_result, tiny_dataset_dir):
    import pandas as pd

    lengths = pd.read_parquet(tiny_dataset_dir / "train.parquet")["length"]
    # 5 steps x 4 rows out of 24: some rows, never padding (that would exceed the longest rows).
    assert lengths.min() * 20 <= lora_result.tokens_seen <= lengths.max() * 20


def test_collator_keeps_provided_labels(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The batch the model sees has the Parquet input_ids unchanged and -100 where labels were masked."""
    import pandas as pd
    import torch

    trainer, tok, _ = build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, seed=0, batching="padded"))
    df = pd.read_parquet(tiny_dataset_dir / "train.parquet")
    rows = {tuple(r.input_ids): list(r.labels) for r in df.itertuples()}
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "labels", "attention_mask"}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        key = tuple(ids[:n].tolist())
        assert key in rows, "TRL re-tokenized or altered input_ids"
        assert labels[:n].tolist() == rows[key]  # masked prompt tokens stay -100
        assert (labels[n:] == -100).all()  # padding is never trained on
        assert (ids[n:] == tok.pad_token_id).all()
    # Loss equals a manual mean over supervised (shifted) tokens only.
    model = trainer.model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                               ignore_index=-100)
    assert torch.isclose(out.loss, manual, atol=1e-5)


def test_full_finetune_saves_model(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="full", max_steps=2, learning_rate=1e-4))
    assert r.adapter_dir is None
    assert (Path(r.model_dir) / "model.safetensors").is_file()
    assert r.trainable_parameters == r.total_parameters
    assert math.isfinite(r.train_loss)


def test_empty_validation_skips_eval(tiny_model_dir, tmp_path):
    data = write_tiny_sft_dataset(tiny_model_dir, tmp_path / "data", n_train=8, n_val=0, n_test=0)
    r = train(make_cfg(tiny_model_dir, data, tmp_path / "out", max_steps=2))
    assert r.eval_loss is None and r.validation_rows == 0
    assert not any("eval_loss" in h for h in r.history)


def test_checkpoints_must_line_up_with_evaluations(tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="save_steps"):
        build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, eval_steps=3, save_steps=10))


def test_missing_dataset_names_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        train(make_cfg(tiny_model_dir, tmp_path / "nowhere", tmp_path / "out"))


def test_padding_free_batch_is_one_row_and_gives_the_padded_loss(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Padding-free batches concatenate rows (no pad token) and SDPA keeps them apart: same loss as padded."""
    import torch

    padded, tok, _ = build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "a", batching="padded"))
    free, _, _ = build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "b", batching="padding_free"))
    pb = next(iter(padded.get_train_dataloader()))
    fb = next(iter(free.get_train_dataloader()))
    assert "attention_mask" not in fb and fb["input_ids"].shape[0] == 1
    lengths = pb["attention_mask"].sum(1)
    assert fb["input_ids"].shape[1] == int(lengths.sum())  # not one pad token
    assert (fb["position_ids"][0] == 0).sum() == len(lengths)  # positions restart at every row
    rows = [ids[:n] for ids, n in zip(pb["input_ids"], lengths)]
    assert torch.equal(fb["input_ids"][0], torch.cat(rows))  # same rows, same order (same seed)
    model = padded.model.eval()
    with torch.no_grad():
        loss_padded = model(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"], labels=pb["labels"]).loss
        loss_free = model(input_ids=fb["input_ids"], position_ids=fb["position_ids"], labels=fb["labels"]).loss
        # Without position_ids the rows would attend to each other: a different loss.
        leaky = model(input_ids=fb["input_ids"], labels=fb["labels"]).loss
    assert torch.isclose(loss_padded, loss_free, atol=1e-5)
    assert not torch.isclose(loss_padded, leaky, atol=1e-5)


def test_packed_batching_trains(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, batching="packed", packing_length=128, max_steps=2))
    assert r.batching == "packed" and r.global_step == 2 and math.isfinite(r.train_loss)
    # rows are packed into 128-token blocks: each step sees more than 4 conversations' worth of tokens
    assert r.tokens_seen > 2 * 4 * 20


def test_early_stopping_keeps_the_best_checkpoint(tiny_model_dir, tiny_dataset_dir, tmp_path):
    # No decrease counts as an improvement (threshold 10): patience 2 stops after the 3rd evaluation.
    r = train(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, max_steps=40, eval_steps=1, save_steps=1,
                   early_stopping_patience=2, early_stopping_threshold=10.0, save_total_limit=1))
    assert r.early_stopped and r.global_step == 3 < r.max_steps == 40
    evals = {h["step"]: h["eval_loss"] for h in r.history if "eval_loss" in h}
    best_step = min(evals, key=evals.get)
    assert r.best_checkpoint.endswith(f"checkpoint-{best_step}")
    assert r.eval_loss == pytest.approx(evals[best_step])
    assert Path(r.best_checkpoint).is_dir()  # save_total_limit never deletes the best one
