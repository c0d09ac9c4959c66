"""The training fingerprint: what changes it (training fields, dataset bytes, base model) and what does not."""

from __future__ import annotations

import re
import shutil

from sft_pipeline.hashing import files_digest
from sft_pipeline.training import TrainingConfig, dataset_content_hash, model_identity_hash, training_fingerprint


def _cfg(model_dir, data_dir, **kw) -> TrainingConfig:
    return TrainingConfig(model_dir=str(model_dir), dataset_dir=str(data_dir), output_dir="o", **kw)


def test_fingerprint_ignores_where_and_how_it_runs(tiny_model_dir, data_dir):
    base = training_fingerprint(_cfg(tiny_model_dir, data_dir))
    assert re.fullmatch(r"[0-9a-f]{16}", base)  # it names the output folder
    same = _cfg(tiny_model_dir, data_dir, mlflow_tracking_uri="sqlite:///x.db", mlflow_tags={"a": "1"},
                launcher="python", logging_steps=5, resume=False, peak_tflops=100.0)
    same.output_dir = "elsewhere"
    assert training_fingerprint(same) == base
    assert training_fingerprint(_cfg(tiny_model_dir, data_dir, learning_rate=1e-5)) != base


def test_fingerprint_follows_the_training_splits_bytes(tiny_model_dir, data_dir, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "copy")
    assert dataset_content_hash(copy) == dataset_content_hash(data_dir)  # names and bytes, not the folder
    assert dataset_content_hash(data_dir) == \
        files_digest([data_dir / "train.parquet", data_dir / "validation.parquet"], root=data_dir)
    before = training_fingerprint(_cfg(tiny_model_dir, copy))
    (copy / "test.parquet").write_bytes(b"evaluation's, not read by training")
    assert training_fingerprint(_cfg(tiny_model_dir, copy)) == before
    (copy / "train.parquet").write_bytes((copy / "train.parquet").read_bytes() + b"\0")
    assert training_fingerprint(_cfg(tiny_model_dir, copy)) != before


def test_base_model_identity_is_its_path_and_file_stats(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    assert model_identity_hash(tiny_model_dir) == model_identity_hash(tiny_model_dir)
    assert model_identity_hash(copy) != model_identity_hash(tiny_model_dir)  # another folder
    before = model_identity_hash(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert model_identity_hash(copy) != before


def test_fingerprint_ignores_the_launcher_and_keeps_keys_of_older_runs(tiny_model_dir, data_dir):
    """Where the ranks run is not what they train; the fields added with the launchers leave older keys as they were."""
    from sft_pipeline.hashing import json_digest, short
    from sft_pipeline.training.fingerprint import KEYED_WHEN_SET, NON_TRAINING_FIELDS

    base = training_fingerprint(_cfg(tiny_model_dir, data_dir))
    elsewhere = _cfg(tiny_model_dir, data_dir, launcher="ray", use_gpu=False, ray_address="http://head:8265",
                     ray_resources_per_worker={"CPU": 4}, ray_storage_path="s3://b/r", ray_max_failures=2,
                     check_shared_storage=False)
    assert training_fingerprint(elsewhere) == base
    # the same digest as before these fields existed: the old field set, nothing more (LoRA on every block was
    # the only behaviour before lora_last_layers)
    cfg = _cfg(tiny_model_dir, data_dir, lora_last_layers=0)
    old = {k: v for k, v in cfg.to_dict().items() if k not in NON_TRAINING_FIELDS and k not in KEYED_WHEN_SET}
    assert training_fingerprint(cfg) == short(json_digest({"config": old, "dataset": dataset_content_hash(data_dir),
                                                           "model": model_identity_hash(tiny_model_dir)}))
    assert training_fingerprint(cfg) != base  # the default adapts only the last blocks: another training
    # sharding changes the checkpoints' layout: another key
    assert training_fingerprint(_cfg(tiny_model_dir, data_dir, fsdp=True)) != base
    assert training_fingerprint(_cfg(tiny_model_dir, data_dir, num_processes=2, launcher="torchrun")) != base
