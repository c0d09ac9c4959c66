"""Shared builders of the export tests (the unit tier and tests/dagster): a tiny trained adapter, and a SQLite
store holding two registrations of it, version 1 the champion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.unit.registry.helpers import common_kwargs
from tests.unit.training.helpers import write_tiny_sft_dataset

# The tiny tokenizer is trained on the spot: llama.cpp's converter cannot recognize it by its hash, so the
# tests name its pre-tokenizer (byte-level BPE with GPT-2's split, as `tests/tiny_model.py` builds it).
TINY_PRE_TOKENIZER = "gpt-2"


@dataclass
class Store:
    uri: str
    root: Path
    model_name: str
    first: object  # RegistrationInfo of version 1 (champion)
    second: object  # RegistrationInfo of version 2 (kept: a worse score)
    training_run_id: str
    base_model_dir: Path
    trained: object


def train_tiny_adapter(tiny_model_dir, root: Path):
    from sft_pipeline.training import TrainingConfig, train

    data = write_tiny_sft_dataset(tiny_model_dir, root / "data", n_train=8, n_val=4, n_test=6)
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data), output_dir=str(root / "out"),
                         max_steps=3, eval_steps=3, learning_rate=5e-3)
    result = train(cfg)
    result.dataset_dir = str(data)
    return result


def register_two_versions(trained, tiny_model_dir, root: Path, model_name: str) -> Store:
    from mlflow import MlflowClient

    from sft_pipeline.registry import register_model
    from sft_pipeline.tracking import configure

    uri = f"sqlite:///{root}/mlflow.db"
    exp = configure(uri, "sft_pipeline")
    client = MlflowClient(tracking_uri=uri)
    train_run = client.create_run(exp, run_name="train").info.run_id
    client.set_terminated(train_run)
    kwargs = common_kwargs(trained, 0.30)
    kwargs["tags"] = {**kwargs["tags"], "dagster_run_id": "dagster-run-42", "data_version.sft_dataset": "sftdata123",
                      "data_version.fine_tuned_model": "weights456"}
    first = register_model(uri, model_name, trained.adapter_dir, tiny_model_dir, training_run_id=train_run,
                           lineage_key="train-a", **kwargs)
    second = register_model(uri, model_name, trained.adapter_dir, tiny_model_dir, lineage_key="train-b",
                            **common_kwargs(trained, 0.25))
    assert "champion" in first.aliases and "champion" not in second.aliases
    return Store(uri=uri, root=root, model_name=model_name, first=first, second=second, training_run_id=train_run,
                 base_model_dir=Path(tiny_model_dir), trained=trained)
