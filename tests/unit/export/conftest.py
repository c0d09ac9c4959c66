"""Export fixtures: a tiny trained adapter registered twice in one SQLite store, version 1 the champion
(package scope: training and registering cost seconds each)."""

from __future__ import annotations

import pytest

from tests.unit.export.helpers import Store, register_two_versions, train_tiny_adapter


@pytest.fixture(scope="package")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    return train_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("export_train"))


@pytest.fixture(scope="package")
def champion_store(trained_adapter, tiny_model_dir, tmp_path_factory) -> Store:
    return register_two_versions(trained_adapter, tiny_model_dir, tmp_path_factory.mktemp("export_mlflow"), "tiny-export")
