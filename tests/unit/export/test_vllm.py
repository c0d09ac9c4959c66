"""What vLLM refuses in a LoRA folder, the rank flag it needs, and the serve command."""

from __future__ import annotations

import json

import pytest
import torch

from sft_pipeline.export.vllm import required_max_lora_rank, vllm_problems, vllm_serve_command, write_vllm_adapter

GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "modules_to_save": None, "use_dora": False}
NAMES = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


def test_a_plain_lora_adapter_has_no_problems():
    assert vllm_problems(GOOD, NAMES) == []
    # PEFT records "all-linear" as full module paths: still matched by their last part
    full_paths = {**GOOD, "target_modules": ["model.layers.0.self_attn.q_proj"]}
    assert vllm_problems(full_paths, NAMES) == []


@pytest.mark.parametrize("change, reason", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "bias"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"peft_type": "IA3"}, "LoRA adapters only"),
    ({"r": None}, "lacks r"),
    ({"trainable_token_indices": [5, 6]}, "trainable_token_indices"),
])
def test_what_vllm_refuses_is_named(change, reason):
    problems = vllm_problems({**GOOD, **change}, NAMES)
    assert any(reason in p for p in problems), problems


def test_tensors_off_the_target_modules_or_not_peft_named_are_refused():
    assert "not name" in vllm_problems({**GOOD, "target_modules": ["k_proj"]}, NAMES)[0]
    assert "not a PEFT LoRA weight" in vllm_problems(GOOD, ["model.layers.0.q_proj.weight"])[0]
    assert "holds no tensors" in vllm_problems(GOOD, [])[0]


def test_rank_above_16_needs_the_max_lora_rank_flag():
    assert required_max_lora_rank(GOOD) == 8
    assert required_max_lora_rank({**GOOD, "r": 16, "rank_pattern": {"q_proj": 24}}) == 32
    assert vllm_serve_command("HuggingFaceTB/SmolLM2-135M-Instruct", "sft", "/x/adapter", 16) == (
        "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules sft=/x/adapter")
    assert vllm_serve_command("base", "sft", "/a b/adapter", 64, chat_template="/t.jinja") == (
        "vllm serve base --enable-lora --lora-modules sft='/a b/adapter' --max-lora-rank 64 --chat-template /t.jinja")
    assert vllm_serve_command("/exports/abc/merged") == "vllm serve /exports/abc/merged"


def test_write_refuses_an_adapter_vllm_cannot_load_and_converts_bin(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tensors = {NAMES[0]: torch.zeros(2, 4), NAMES[1]: torch.zeros(4, 2)}
    torch.save(tensors, src / "adapter_model.bin")
    (src / "adapter_config.json").write_text(json.dumps({**GOOD, "modules_to_save": ["embed_tokens"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        write_vllm_adapter(src, tmp_path / "out", "base")
    (src / "adapter_config.json").write_text(json.dumps(GOOD))
    files, facts = write_vllm_adapter(src, tmp_path / "out", "org/base")
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"
    assert facts["tensors"] == 2 and facts["max_lora_rank"] == 8 and facts["target_modules"] == ["q_proj", "v_proj"]
