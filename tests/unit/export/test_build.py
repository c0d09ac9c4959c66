"""`export_champion` on a tiny registered model: the three exports written, verified and published, reused
while the champion stays, redone when it moves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_pipeline.export import ExportSettings, export_champion, find_export
from sft_pipeline.export import build as build_module
from sft_pipeline.registry import set_alias
from tests.unit.export.helpers import TINY_PRE_TOKENIZER


def settings(**overrides) -> ExportSettings:
    values = dict(gguf_quantization="f32", gguf_pre_tokenizer=TINY_PRE_TOKENIZER, num_prompts=4, max_new_tokens=12)
    values.update(overrides)
    return ExportSettings(**values)


@pytest.fixture(scope="module")
def exported(champion_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return export_champion(champion_store.uri, champion_store.model_name, root, settings()), root


def test_exports_the_champion_merged_adapter_and_gguf_each_verified(exported, champion_store):
    from transformers import AutoModelForCausalLM

    info, root = exported
    assert info.version == 1 and info.model_sha256 == champion_store.first.model_sha256 and not info.reused
    assert Path(info.path).parent == root and Path(info.path).name == info.digest[:16]
    info.verify()  # every listed file is there and matches the digest
    assert {name: e["status"] for name, e in info.exports.items()} == {"merged": "verified", "adapter": "verified",
                                                                        "gguf": "verified"}
    # the prompts are the version's held-out test split, cut before the answer
    assert info.prompts["source"].startswith("test split ") and info.prompts["count"] == 4

    merged = info.export_path("merged")
    files = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "README.md"} <= files
    assert "adapter_config.json" not in files
    figures = info.exports["merged"]["figures"]
    assert figures["identical_answers"] == figures["prompts"] == 4 and figures["passed"]
    assert figures["teacher_forced_token_agreement"] == 1.0

    # the merged folder is a standard HF folder: its greedy answers are the registered model's, reloaded here
    record = json.loads((Path(info.path) / "export.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    import torch
    for prompt, answer in zip(record["prompt_ids"], record["reference_answers"]):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=len(answer), do_sample=False)
        assert out[0, len(prompt):].tolist()[: len(answer)] == answer

    gguf = info.exports["gguf"]
    assert gguf["quantization"] == "f32" and Path(gguf["path"]).is_file() and gguf["path"].endswith("-v1-f32.gguf")
    assert gguf["figures"]["token_agreement"] == 1.0 and gguf["figures"]["exact_match"] == 1.0  # f32 is lossless
    assert gguf["figures"]["tokenizer"]["share"] == 1.0
    modelfile = Path(gguf["modelfile"]).read_text()
    assert modelfile.startswith(f"FROM ./{Path(gguf['path']).name}\n") and "<|im_start|>" in modelfile


def test_model_card_has_evaluation_and_lineage(exported, champion_store):
    info, _ = exported
    card = (info.export_path("merged") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"base_model: {champion_store.base_model_dir.resolve()}" in card
    assert "dagster-run-42" in card  # Dagster run
    assert champion_store.first.run_id in card and champion_store.training_run_id in card  # MLflow runs
    assert "`sft_dataset`: `sftdata123`" in card and "dataset sha256 of `test`" in card  # data versions
    assert "| mmlu_accuracy | 0.3 |" in card  # the evaluation scores
    assert "## Verification" in card and "| merged | verified | 4/4 |" in card
    assert "## Registered model card" in card  # the version's own card (description), nested


def test_adapter_is_in_the_layout_vllm_loads(exported, champion_store):
    from safetensors.torch import load_file

    info, _ = exported
    adapter = info.export_path("adapter")
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                          "chat_template.jinja"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(champion_store.base_model_dir.resolve())
    assert not config.get("modules_to_save") and config["bias"] == "none" and not config["use_dora"]
    assert config["r"] <= 16 and config["target_modules"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    registered = load_file(str(Path(champion_store.trained.adapter_dir) / "adapter_model.safetensors"))
    assert tensors.keys() == registered.keys() and all((tensors[k] == registered[k]).all() for k in tensors)
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    entry = info.exports["adapter"]
    assert entry["vllm_command"] == (f"vllm serve {champion_store.base_model_dir.resolve()} --enable-lora "
                                     f"--lora-modules sft={info.path}/adapter --chat-template {info.path}/adapter/chat_template.jinja")
    assert entry["figures"]["identical_answers"] == 4
    assert "--lora-modules sft=./adapter" in (adapter / "README.md").read_text()


def test_unchanged_champion_is_reused_without_work(exported, champion_store, monkeypatch):
    info, root = exported

    def no_work(*args, **kwargs):
        raise AssertionError("the champion did not move: nothing may be loaded or written")

    monkeypatch.setattr(build_module, "download_logged_model", no_work)
    again = export_champion(champion_store.uri, champion_store.model_name, root, settings())
    assert again.reused and again.path == info.path and again.digest == info.digest
    assert find_export(root, info.key).path == info.path


def test_a_damaged_export_is_not_reused(champion_store, tmp_path):
    first = export_champion(champion_store.uri, champion_store.model_name, tmp_path,
                            settings(merged=False, gguf_quantization="", num_prompts=1, max_new_tokens=2))
    weights = Path(first.export_path("adapter")) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    assert find_export(tmp_path, first.key) is None


def test_moving_the_champion_exports_the_new_one_and_a_rollback_reuses(champion_store, tmp_path):
    quick = settings(gguf_quantization="", num_prompts=2, max_new_tokens=4)
    one = export_champion(champion_store.uri, champion_store.model_name, tmp_path, quick)
    set_alias(champion_store.uri, champion_store.model_name, "champion", 2, reason="test: promote by hand")
    try:
        two = export_champion(champion_store.uri, champion_store.model_name, tmp_path, quick)
        assert two.version == 2 and not two.reused and two.key != one.key
        set_alias(champion_store.uri, champion_store.model_name, "champion", 1, reason="test: roll back")
        back = export_champion(champion_store.uri, champion_store.model_name, tmp_path, quick)
        assert back.version == 1 and back.reused and back.path == one.path
    finally:
        set_alias(champion_store.uri, champion_store.model_name, "champion", 1, reason="test: restore")


def test_quantized_gguf_is_within_its_tolerance(champion_store, tmp_path):
    info = export_champion(champion_store.uri, champion_store.model_name, tmp_path,
                           settings(merged=False, adapter=False, gguf_quantization="q8_0"))
    assert set(info.exports) == {"gguf"}  # the merged folder it was converted from is not shipped
    figures = info.exports["gguf"]["figures"]
    assert figures["passed"] and figures["required"] == "token_agreement >= 0.9"
    assert 0.9 <= figures["token_agreement"] <= 1.0 and figures["tokens"] > 0
    assert info.exports["gguf"]["bytes"] == Path(info.exports["gguf"]["path"]).stat().st_size > 0
    assert {p.parts[-2] for p in map(Path, info.files) if len(p.parts) > 1} == {"gguf"}


def test_no_champion_exports_nothing(champion_store, tmp_path):
    info = export_champion(champion_store.uri, "no-such-model", tmp_path, settings())
    assert not info.exported and info.version is None and "nothing to export" in info.note
    info.verify()  # nothing to check


def test_a_version_logged_merged_exports_the_merged_folder_and_says_there_is_no_adapter(champion_store, tmp_path):
    from sft_pipeline.registry import register_model

    register_model(champion_store.uri, "tiny-export-merged", champion_store.trained.adapter_dir,
                   champion_store.base_model_dir, metrics={"mmlu_accuracy": 0.3}, params={}, tags={},
                   log_mode="merged", promote_to="champion")
    info = export_champion(champion_store.uri, "tiny-export-merged", tmp_path,
                           settings(gguf_quantization="", num_prompts=2, max_new_tokens=4))
    assert info.exports["merged"]["status"] == "verified" and info.exports["merged"]["figures"]["identical_answers"] == 2
    assert info.exports["adapter"]["status"] == "skipped" and "log_mode=merged" in info.exports["adapter"]["reason"]
