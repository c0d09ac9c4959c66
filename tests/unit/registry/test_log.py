"""The logged model: adapter-only or merged weights, model card, signature, input example; it loads back and generates."""

from __future__ import annotations

from pathlib import Path

from sft_pipeline.registry import load_registered_model, register_model
from sft_pipeline.tracking import use_tracking_uri


def test_logged_model_is_adapter_only_has_card_signature_example_and_generates(registered, tiny_model_dir):
    from mlflow.models import get_model_info

    uri, root, *_ = registered
    with use_tracking_uri(uri) as mlflow:
        local = Path(mlflow.artifacts.download_artifacts("models:/tiny-sft@champion", dst_path=str(root / "dl")))
        info = get_model_info("models:/tiny-sft@champion")
    files = {p.name for p in local.rglob("*")}
    assert "adapter_model.safetensors" in files
    assert "model.safetensors" not in files  # base weights are referenced, not copied
    assert {"model_card.md", "input_example.json"} <= files
    card = (local / "model_card.md").read_text()
    assert "## Scores" in card and "mmlu_accuracy" in card and "## Data" in card and "## Configuration" in card
    # Logged as a chat model (MLflow's llm/v1/chat task): OpenAI-style messages in, chat completions out.
    assert "messages" in {c["name"] for c in info.signature.inputs.to_dict()}

    model = load_registered_model(uri, "models:/tiny-sft@champion")
    out = model.predict({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 5})
    assert out[0]["object"] == "chat.completion" and isinstance(out[0]["choices"][0]["message"]["content"], str)
    components = load_registered_model(uri, "models:/tiny-sft/1", flavor="transformers", return_type="components")
    assert type(components["model"]).__name__.startswith("Peft")


def test_merged_mode_stores_full_weights_and_generates(trained, tiny_model_dir, store, tmp_path):
    uri, _ = store
    info = register_model(uri, "tiny-merged", trained.adapter_dir, tiny_model_dir, metrics={"mmlu_accuracy": 0.3},
                          params={}, tags={}, log_mode="merged", promote_to="champion")
    assert info.log_mode == "merged" and info.aliases == ["candidate", "champion"]
    with use_tracking_uri(uri) as mlflow:
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    files = {p.name for p in local.rglob("*")}
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    components = load_registered_model(uri, "models:/tiny-merged@champion", flavor="transformers", return_type="components")
    assert not type(components["model"]).__name__.startswith("Peft")
    out = load_registered_model(uri, "models:/tiny-merged@champion").predict({"messages": [{"role": "user", "content": "Hi"}],
                                                                              "max_tokens": 3})
    assert isinstance(out[0]["choices"][0]["message"]["content"], str)
