"""Registry: log a trained tiny adapter to MLflow, register versions, gated compare-and-set promotion,
alias history, idempotence, loading back offline; against a SQLite store and a real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sft_pipeline.registry import (
    alias_history,
    get_model_version_by_alias,
    hash_model_files,
    load_registered_model,
    promote_if_better,
    register_model,
    set_alias,
)
from sft_pipeline.training import TrainingConfig, train
from tests.test_training import write_tiny_sft_dataset


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


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_train")
    data = write_tiny_sft_dataset(tiny_model_dir, root / "data", n_train=8, n_val=4, n_test=4)
    cfg = TrainingConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data), output_dir=str(root / "out"),
                         max_steps=2, eval_steps=2)
    result = train(cfg)
    result.dataset_dir = str(data)
    return result


def _datasets(trained) -> dict[str, Path]:
    return {split: Path(trained.dataset_dir) / f"{split}.parquet" for split in ("train", "validation", "test")}


def _common(trained, accuracy: float) -> dict:
    return dict(
        metrics={"mmlu_accuracy": accuracy, "train_loss": trained.train_loss, "nan_metric": float("nan")},
        params={"method": "lora", "max_steps": 2},
        tags={"dagster_run_id": "run-1", "base_model_revision": "tiny-rev", "code_version.fine_tuned_model": "1"},
        promote_to="champion",
        promotion_metric="mmlu_accuracy",
        datasets=_datasets(trained),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating a store's schema costs seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", root


@pytest.fixture(scope="module")
def registered(trained, tiny_model_dir, store):
    """Three registrations of the same adapter files, each a different training run, into one SQLite store."""
    from mlflow import MlflowClient

    uri, root = store
    client = MlflowClient(tracking_uri=uri)
    from sft_pipeline.registry import ensure_experiment

    exp = ensure_experiment(uri, "sft_pipeline")
    train_run = client.create_run(exp, run_name="train", tags={"sft_pipeline.stage": "training"}).info.run_id
    client.set_terminated(train_run)
    eval_run = client.create_run(exp, run_name="eval", tags={"sft_pipeline.stage": "evaluation"}).info.run_id
    client.set_terminated(eval_run)
    first = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, training_run_id=train_run,
                           evaluation_run_id=eval_run, lineage_key="train-a", **_common(trained, 0.30))
    worse = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, lineage_key="train-b", **_common(trained, 0.25))
    gate_failed = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, lineage_key="train-c",
                                 gate_passed=False, gate_reasons=["MMLU accuracy fell"], **_common(trained, 0.90))
    return uri, root, first, worse, gate_failed, train_run, eval_run


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
    again = register_model(uri, "tiny-sft", trained.adapter_dir, tiny_model_dir, lineage_key="train-b", **_common(trained, 0.25))
    assert again.created is False and again.version == 2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'tiny-sft'")) == 3
    assert again.model_sha256 == hash_model_files(trained.adapter_dir)


def test_version_tags_and_two_way_lineage(registered, trained):
    from mlflow import MlflowClient

    uri, root, first, _, _, train_run, eval_run = registered
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version("tiny-sft", "1")
    assert mv.tags["dagster_run_id"] == "run-1" and mv.tags["base_model_revision"] == "tiny-rev"
    assert mv.tags["code_version.fine_tuned_model"] == "1"
    assert float(mv.tags["score.mmlu_accuracy"]) == pytest.approx(0.30)
    assert "score.nan_metric" not in mv.tags
    assert mv.tags["training_run_id"] == train_run and mv.tags["evaluation_run_id"] == eval_run
    assert mv.tags["sft_pipeline.model_sha256"] == hash_model_files(trained.adapter_dir)
    assert set(first.dataset_digests) == {"train", "validation", "test"}
    assert mv.tags["dataset_sha256.train"] == first.dataset_digests["train"]
    assert mv.run_id == first.run_id
    assert "## Data" in mv.description and "mmlu_accuracy" in mv.description

    reg_run = client.get_run(first.run_id)
    assert reg_run.data.tags["mlflow.parentRunId"] == train_run
    assert reg_run.data.params["method"] == "lora"
    assert "mmlu_accuracy" in reg_run.data.metrics and "nan_metric" not in reg_run.data.metrics
    assert reg_run.info.artifact_uri.startswith((Path(root) / "mlartifacts").as_uri())
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in reg_run.inputs.dataset_inputs}
    assert contexts == {"train": "train", "validation": "validation", "test": "test"}
    assert {i.dataset.digest for i in reg_run.inputs.dataset_inputs} == {d[:16] for d in first.dataset_digests.values()}

    training = client.get_run(train_run)
    assert training.data.tags["sft_pipeline.registered_version"] == "1"
    assert training.data.tags["sft_pipeline.registration_run_id"] == first.run_id
    assert {i.dataset.name for i in training.inputs.dataset_inputs} == {"train", "validation"}
    evaluation = client.get_run(eval_run)
    assert evaluation.data.tags["mlflow.parentRunId"] == train_run
    assert {i.dataset.name for i in evaluation.inputs.dataset_inputs} == {"test"}


def test_alias_history_records_every_move(registered):
    uri, *_ = registered
    history = alias_history(uri, "tiny-sft")
    assert [(h["alias"], h["version"]) for h in history] == [
        ("candidate", 1), ("champion", 1), ("candidate", 2), ("candidate", 3),
    ]
    assert history[2]["previous_version"] == 1
    assert [h["version"] for h in alias_history(uri, "tiny-sft", "champion")] == [1]


def test_logged_model_is_adapter_only_has_card_signature_example_and_generates(registered, tiny_model_dir):
    from mlflow.models import get_model_info

    uri, root, *_ = registered
    with __import__("sft_pipeline.registry", fromlist=["_tracking"])._tracking(uri) as mlflow:
        local = Path(mlflow.artifacts.download_artifacts("models:/tiny-sft@champion", dst_path=str(root / "dl")))
        info = get_model_info("models:/tiny-sft@champion")
    files = {p.name for p in local.rglob("*")}
    assert "adapter_model.safetensors" in files
    assert "model.safetensors" not in files  # base weights are referenced, not copied
    assert {"model_card.md", "input_example.json"} <= files
    card = (local / "model_card.md").read_text()
    assert "## Scores" in card and "mmlu_accuracy" in card and "## Data" in card and "## Configuration" in card
    assert info.signature.inputs.to_dict()[0]["type"] == "string"
    assert {p.name for p in info.signature.params} >= {"max_new_tokens", "do_sample"}

    model = load_registered_model(uri, "models:/tiny-sft@champion")
    out = model.predict(["What is the capital of France?"], params={"max_new_tokens": 5, "do_sample": False})
    assert isinstance(out[0], str)
    components = load_registered_model(uri, "models:/tiny-sft/1", flavor="transformers", return_type="components")
    assert type(components["model"]).__name__.startswith("Peft")


def test_merged_mode_stores_full_weights_and_generates(trained, tiny_model_dir, store, tmp_path):
    uri, _ = store
    info = register_model(uri, "tiny-merged", trained.adapter_dir, tiny_model_dir, metrics={"mmlu_accuracy": 0.3},
                          params={}, tags={}, log_mode="merged", promote_to="champion")
    assert info.log_mode == "merged" and info.aliases == ["candidate", "champion"]
    with __import__("sft_pipeline.registry", fromlist=["_tracking"])._tracking(uri) as mlflow:
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    files = {p.name for p in local.rglob("*")}
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    components = load_registered_model(uri, "models:/tiny-merged@champion", flavor="transformers", return_type="components")
    assert not type(components["model"]).__name__.startswith("Peft")
    out = load_registered_model(uri, "models:/tiny-merged@champion").predict(["Hi"], params={"max_new_tokens": 3})
    assert isinstance(out[0], str)


def _bare_versions(uri: str, name: str, scores: list[float]) -> None:
    """Versions without a logged model (fast): only the score tags promotion compares."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(name)
    for score in scores:
        client.create_model_version(name, source="file:///nonexistent", tags={"score.acc": repr(score)})


def test_two_concurrent_promotions_cannot_both_take_champion(store):
    uri, _ = store
    _bare_versions(uri, "race", [0.5, 0.6, 0.7, 0.4, 0.55, 0.9, 0.8])
    promote_if_better(uri, "race", 1, metric="acc")
    # 0.6 vs 0.7: the better takes it; 0.4 vs 0.55: neither beats 0.7; 0.9 vs 0.8: the better takes it.
    for pair, expected in (((2, 3), 3), ((4, 5), 3), ((6, 7), 6)):
        barrier = threading.Barrier(2)
        decisions = {}

        def promote(version):
            barrier.wait()
            decisions[version] = promote_if_better(uri, "race", version, metric="acc")

        threads = [threading.Thread(target=promote, args=(v,)) for v in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert int(get_model_version_by_alias(uri, "race", "champion").version) == expected, decisions
        for version, decision in decisions.items():
            if version == expected or version not in pair:
                continue
            if decision.promoted:  # it went first and was then beaten by the better one
                assert [h["version"] for h in alias_history(uri, "race", "champion")][-2:] == [version, expected]
            else:
                assert "does not beat" in decision.reason, decision
    champion_moves = [h["version"] for h in alias_history(uri, "race", "champion")]
    assert champion_moves[0] == 1 and champion_moves[-1] == 6
    scores = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.4, 5: 0.55, 6: 0.9, 7: 0.8}
    assert all(scores[b] > scores[a] for a, b in zip(champion_moves, champion_moves[1:]))  # monotone


def test_lower_is_better_ties_and_manual_rollback(store):
    uri, _ = store
    _bare_versions(uri, "loss", [1.0, 1.0, 0.8])
    assert promote_if_better(uri, "loss", 1, metric="acc", higher_is_better=False).promoted
    tie = promote_if_better(uri, "loss", 2, metric="acc", higher_is_better=False)
    assert not tie.promoted and "lower is better" in tie.reason  # a tie does not beat
    assert promote_if_better(uri, "loss", 3, metric="acc", higher_is_better=False).promoted
    set_alias(uri, "loss", "champion", 1, reason="rollback: bad outputs in production")
    assert int(get_model_version_by_alias(uri, "loss", "champion").version) == 1
    assert alias_history(uri, "loss", "champion")[-1]["reason"].startswith("rollback")
    missing = promote_if_better(uri, "loss", 3, metric="f1")
    assert not missing.promoted and "no score" in missing.reason


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

    from sft_pipeline.registry import _tracking

    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    with _tracking(f"sqlite:///{tmp_path / 'a.db'}"):
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
                           **_common(trained, 0.4))
    again = register_model(mlflow_server, "served-sft", trained.adapter_dir, tiny_model_dir, lineage_key="s1",
                           **_common(trained, 0.4))
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
    assert isinstance(model.predict(["Hello"], params={"max_new_tokens": 3})[0], str)
