"""Registry: log a trained tiny adapter to MLflow (SQLite), register versions, aliases, load back."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_pipeline.registry import get_model_version_by_alias, register_model, set_alias
from sft_pipeline.training import TrainingConfig, train
from tests.test_training import write_tiny_sft_dataset


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_train")
    data = write_tiny_sft_dataset(tiny_model_dir, root / "data", n_train=8, n_val=4, n_test=0)
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data), output_dir=str(root / "out"),
                         max_steps=2, eval_steps=2)
    return train(cfg)


@pytest.fixture(scope="module")
def registered(trained, tiny_model_dir, tmp_path_factory):
    """Two registrations of the same adapter into one SQLite store."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    common = dict(
        metrics={"eval_loss": trained.eval_loss, "train_loss": trained.train_loss, "nan_metric": float("nan")},
        params={"method": "lora", "max_steps": 2},
        tags={"dagster_run_id": "run-1", "base_model": "tiny"},
    )
    first = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, training_run_id="train-123", **common)
    second = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, promote_to="champion", **common)
    return uri, root, first, second


def test_versions_and_aliases(registered):
    uri, _, first, second = registered
    assert first.version == 1 and second.version == 2
    assert first.aliases == ["candidate"]
    assert second.aliases == ["candidate", "champion"]  # alias moved to the newest version
    assert first.model_uri == "models:/tiny-sft/1"
    assert int(get_model_version_by_alias(uri, "tiny-sft", "candidate").version) == 2
    assert int(get_model_version_by_alias(uri, "tiny-sft", "champion").version) == 2
    set_alias(uri, "tiny-sft", "champion", 1)
    assert int(get_model_version_by_alias(uri, "tiny-sft", "champion").version) == 1
    set_alias(uri, "tiny-sft", "champion", 2)


def test_run_and_version_metadata(registered):
    from mlflow import MlflowClient

    uri, root, first, _ = registered
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version("tiny-sft", "1")
    assert mv.tags["dagster_run_id"] == "run-1" and mv.tags["base_model"] == "tiny"
    assert mv.tags["training_run_id"] == "train-123"
    assert mv.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.data.tags["dagster_run_id"] == "run-1"
    assert run.data.params["method"] == "lora"
    assert "eval_loss" in run.data.metrics and "nan_metric" not in run.data.metrics
    # artifacts beside the DB, not in the working directory
    assert run.info.artifact_uri.startswith((Path(root) / "mlartifacts").as_uri())


def test_logged_model_is_adapter_only_and_generates(registered, tiny_model_dir):
    import mlflow

    uri, root, _, _ = registered
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-sft@candidate", dst_path=str(root / "dl")))
    files = {p.name for p in local.rglob("*")}
    assert "adapter_model.safetensors" in files
    assert "model.safetensors" not in files  # base weights are referenced, not copied

    model = mlflow.pyfunc.load_model("models:/tiny-sft@candidate")
    out = model.predict(["What is the capital of France?"], params={"max_new_tokens": 5, "do_sample": False})
    assert isinstance(out[0], str)

    components = mlflow.transformers.load_model("models:/tiny-sft/1", return_type="components")
    assert type(components["model"]).__name__.startswith("Peft")


def test_bad_inputs(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="adapter_dir"):
        register_model(f"sqlite:///{tmp_path}/m.db", "x", tmp_path / "nope", tiny_model_dir,
                       metrics={}, params={}, tags={})


def test_registering_leaves_no_global_mlflow_uri_behind(tmp_path):
    """After register_model, a client for another store must still talk to that store."""
    import os

    import mlflow

    from sft_pipeline.registry import _tracking

    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    with _tracking(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    other = f"sqlite:///{tmp_path / 'b.db'}"
    assert mlflow.MlflowClient(tracking_uri=other)._registry_uri == other
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")) == before
