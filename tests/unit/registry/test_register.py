"""register_model: versions, candidate/champion through registration, idempotence by model digest, bad inputs,
no global MLflow state left behind; against a SQLite store and a real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sft_pipeline.hashing import model_digest
from sft_pipeline.registry import (
    alias_history,
    get_model_version_by_alias,
    load_registered_model,
    promote_if_better,
    register_model,
)
from tests.unit.registry.helpers import common_kwargs


def test_candidate_on_every_version_champion_only_when_gated_and_better(registered):
    uri, _, first, worse, gate_failed, _, _ = registered
    assert (first.version, worse.version, gate_failed.version) == (1, 2, 3)
    assert first.created and worse.created and gate_failed.created
    assert first.promotion["promoted"] is True and "first champion" in first.promotion["reason"]
    assert worse.promotion["promoted"] is False and "does not beat champion version 1" in worse.promotion["reason"]
    assert gate_failed.promotion["promoted"] is False and "gate failed: MMLU accuracy fell" == gate_failed.promotion["reason"]
    assert int(get_model_version_by_alias(uri, "tiny-sft", "candidate").version) == 3
    assert int(get_model_version_by_alias(uri, "tiny-sft", "champion").version) == 1
    from mlflow import MlflowClient

    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("tiny-sft", "2")
    assert mv.tags["sft_pipeline.promotion.champion"] == "kept"
    assert "does not beat" in mv.tags["sft_pipeline.promotion.champion.reason"]


def test_same_model_twice_returns_the_same_version(registered, trained, tiny_model_dir):
    uri, *_ = registered
    again = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, lineage_key="train-b", **common_kwargs(trained, 0.25))
    assert again.created is False and again.version == 2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'tiny-sft'")) == 3
    assert again.model_sha256 == model_digest(trained.adapter_dir)


def test_bad_inputs(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="adapter_dir"):
        register_model(f"sqlite:///{tmp_path}/m.db", "x", tmp_path / "nope", tiny_model_dir,
                       metrics={}, params={}, tags={})
    with pytest.raises(ValueError, match="log_mode"):
        register_model(f"sqlite:///{tmp_path}/m.db", "x", tmp_path, tiny_model_dir,
                       metrics={}, params={}, tags={}, log_mode="quantized")


def test_registering_leaves_no_global_mlflow_uri_behind(tmp_path, store):
    """After register_model, a client for another store must still talk to that store."""
    import mlflow

    from sft_pipeline.tracking import use_tracking_uri

    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    with use_tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    other = store[0]
    assert mlflow.MlflowClient(tracking_uri=other)._registry_uri == other
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")) == before


# ------------------------------------------------------------------------------------------
# A real tracking server: `mlflow server` on loopback with a SQLite backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # readiness poll, not a test time limit
            if process.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy:\n" + (root / "server.log").read_text()[-3000:])
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_against_a_real_tracking_server(mlflow_server, trained, tiny_model_dir):
    first = register_model(mlflow_server, "served-sft", trained.adapter_dir, tiny_model_dir, lineage_key="s1",
                           **common_kwargs(trained, 0.4))
    again = register_model(mlflow_server, "served-sft", trained.adapter_dir, tiny_model_dir, lineage_key="s1",
                           **common_kwargs(trained, 0.4))
    assert (first.version, again.version, again.created) == (1, 1, False)
    assert first.aliases == ["candidate", "champion"] and again.aliases == ["candidate", "champion"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    client.create_model_version("served-sft", source=first.source_uri, model_id=first.source_uri.rsplit("/", 1)[-1],
                                tags={"score.mmlu_accuracy": "0.1"})
    worse = promote_if_better(mlflow_server, "served-sft", 2, metric="mmlu_accuracy")
    assert not worse.promoted and "does not beat champion version 1" in worse.reason
    assert int(get_model_version_by_alias(mlflow_server, "served-sft", "champion").version) == 1
    assert [(h["alias"], h["version"]) for h in alias_history(mlflow_server, "served-sft")] == [("candidate", 1), ("champion", 1)]
    assert first.source_uri and not first.source_uri.startswith("file:")
    model = load_registered_model(mlflow_server, "models:/served-sft@champion")
    reply = model.predict({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})[0]
    assert isinstance(reply["choices"][0]["message"]["content"], str)
