"""Loading a causal LM for scoring (dtype, padding side, merged adapter), left-padded batches and greedy generation."""

import pytest
import torch

from sft_pipeline.modeling import (
    encode_context,
    generate_responses,
    left_padded_batches,
    load_causal_lm,
    load_model_for_eval,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model_for_eval(tiny_model_dir, device="cpu")


def test_loaded_for_eval(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_adapter_is_merged(tiny_model_dir, tmp_path, model_and_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # init_lora_weights=False: a non-zero update, so the adapter visibly changes the logits.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tokens = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        expected = peft_model.eval()(tokens).logits
    merged, _ = load_model_for_eval(tiny_model_dir, adapter_dir=tmp_path / "adapter", device="cpu")
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(tokens).logits
        plain = model_and_tokenizer[0](tokens).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_greedy_generation_matches_one_by_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    contexts = [[{"role": "user", "content": "Write a short poem about the sea."}],
                [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Capital of France?"}]]
    batched = generate_responses(model, tokenizer, contexts, max_new_tokens=8, batch_size=2)
    for turns, got in zip(contexts, batched):
        ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = list(ids)
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tokenizer.eos_token_id:
                    break
        prompt_len = len(tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        assert got == tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()


def test_unmerged_adapter_stays_a_peft_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_causal_lm(tiny_model_dir, tmp_path / "adapter", merge_adapter=False)
    assert hasattr(model, "peft_config") and not model.training


def test_tokenizer_padding_side_and_pad_token(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="right")
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None


def test_left_padded_batches_bucket_by_length_and_pad_left():
    encoded = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    batches = list(left_padded_batches(encoded, batch_size=2, pad_id=0))
    assert [idx for idx, _, _ in batches] == [[1, 2], [0, 3]]
    idx, input_ids, attention = batches[1]
    assert input_ids.tolist() == [[0, 1, 2, 3], [7, 8, 9, 10]]
    assert attention.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert list(left_padded_batches([], 4, 0)) == []


def test_encode_context_adds_no_second_bos(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    plain = encode_context(tokenizer, "hello there")
    assert plain == list(tokenizer.encode("hello there"))
    if tokenizer.bos_token:
        with_bos = encode_context(tokenizer, tokenizer.bos_token + "hello there")
        assert with_bos.count(tokenizer.bos_token_id) == 1
