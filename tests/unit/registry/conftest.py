"""Registry fixtures: a tiny trained adapter, one SQLite store, and three registrations of it, shared by the
package's test files (package scope: training and creating a store's schema cost seconds each)."""

from __future__ import annotations

import os

import pytest

from sft_pipeline.registry import register_model
from sft_pipeline.training import TrainingConfig, train
from tests.unit.training.helpers import write_tiny_sft_dataset
from tests.unit.registry.helpers import common_kwargs


@pytest.fixture(autouse=True)
def _no_global_mlflow_state():
    """Every test leaves MLflow's process-wide URIs as it found them."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved[:2]
    for name, value in zip(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"), saved[2:]):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert mlflow.get_tracking_uri() is not None


@pytest.fixture(scope="package")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_train")
    data = write_tiny_sft_dataset(tiny_model_dir, root / "data", n_train=8, n_val=4, n_test=4)
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data), output_dir=str(root / "out"),
                         max_steps=2, eval_steps=2)
    result = train(cfg)
    result.dataset_dir = str(data)
    return result


@pytest.fixture(scope="package")
def store(tmp_path_factory):
    """One SQLite store for the package (creating a store's schema costs seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", root


@pytest.fixture(scope="package")
def registered(trained, tiny_model_dir, store):
    """Three registrations of the same adapter files, each a different training run, into one SQLite store."""
    from mlflow import MlflowClient

    from sft_pipeline.tracking import configure

    uri, root = store
    client = MlflowClient(tracking_uri=uri)
    exp = configure(uri, "sft_pipeline")
    train_run = client.create_run(exp, run_name="train", tags={"sft_pipeline.stage": "training"}).info.run_id
    client.set_terminated(train_run)
    eval_run = client.create_run(exp, run_name="eval", tags={"sft_pipeline.stage": "evaluation"}).info.run_id
    client.set_terminated(eval_run)
    first = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, training_run_id=train_run,
                           evaluation_run_id=eval_run, lineage_key="train-a", **common_kwargs(trained, 0.30))
    worse = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, lineage_key="train-b",
                           **common_kwargs(trained, 0.25))
    gate_failed = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, lineage_key="train-c",
                                 gate_passed=False, gate_reasons=["MMLU accuracy fell"], **common_kwargs(trained, 0.90))
    return uri, root, first, worse, gate_failed, train_run, eval_run
