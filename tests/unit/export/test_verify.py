"""Greedy answers, their comparison with the registered model's, the tolerance, the prompts and the settings."""

from __future__ import annotations

import pandas as pd
import pytest

from sft_pipeline.export import ExportSettings, ExportVerificationError
from sft_pipeline.export.prompts import export_prompts, fallback_prompts, held_out_prompts
from sft_pipeline.export.verify import (
    compare_answers,
    eos_token_ids,
    greedy_answers,
    require,
    teacher_forced_agreement,
)


def test_compare_answers_counts_identical_answers_and_leading_tokens():
    figures = compare_answers([(1, 2, 3), (4, 5)], [(1, 2, 9), (4, 5)])
    assert figures["identical_answers"] == 1 and figures["exact_match"] == 0.5
    assert figures["leading_tokens_matched"] == 4 and figures["reference_tokens"] == 5


def test_require_raises_outside_the_tolerance_and_records_the_verdict():
    exact = {"prompts": 2, "identical_answers": 2, "exact_match": 1.0, "leading_token_share": 1.0}
    assert require(exact, what="merged", min_agreement=1.0, exact=True)["passed"]
    with pytest.raises(ExportVerificationError, match="1/2 identical answers"):
        require({**exact, "identical_answers": 1, "exact_match": 0.5}, what="merged", min_agreement=1.0, exact=True)
    quantized = {"prompts": 2, "identical_answers": 0, "exact_match": 0.0, "token_agreement": 0.93}
    assert require(quantized, what="gguf", min_agreement=0.9, exact=False)["required"] == "token_agreement >= 0.9"
    with pytest.raises(ExportVerificationError, match="token agreement 0.9300"):
        require(quantized, what="gguf", min_agreement=0.95, exact=False)


def test_held_out_prompts_stop_before_the_answer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "test.parquet"
    pd.DataFrame([
        {"id": "b", "input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
        {"id": "a", "input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"id": "c", "input_ids": [4, 4], "labels": [-100, -100]},  # nothing labeled: skipped
    ]).to_parquet(path)

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    prompts = held_out_prompts(path, Tok(), 5)
    assert prompts.ids == ((1,), (5, 6, 7)) and prompts.texts == ("1", "5 6 7")  # ordered by id
    assert held_out_prompts(path, Tok(), 1).ids == ((1,),)
    # no test split (or one without labels): the built-in instructions, chat-templated
    assert export_prompts(None, AutoTokenizer.from_pretrained(str(tiny_model_dir)), 3).source == "built-in instructions"


def test_greedy_answers_stop_at_eos_and_teacher_forcing_agrees_with_them(tiny_model_dir):
    from sft_pipeline.modeling import load_causal_lm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = load_causal_lm(tiny_model_dir)
    prompts = fallback_prompts(tokenizer, 3)
    assert prompts.texts[0].startswith("<|im_start|>user\nGive three tips") and prompts.texts[0].endswith("assistant\n")
    eos = eos_token_ids(model, tokenizer)
    answers = greedy_answers(model, prompts, 6, eos)
    assert len(answers) == 3 and all(0 < len(a) <= 6 for a in answers)
    assert all(t not in eos for a in answers for t in a[:-1])  # nothing after an EOS
    figures = teacher_forced_agreement(model, prompts, answers)  # the model agrees with its own greedy path
    assert figures["token_agreement"] == 1.0 and figures["identical_answers"] == 3 and figures["max_logprob_gap"] == 0.0
    wrong = [((a[0] + 7) % len(tokenizer),) + a[1:] for a in answers]  # another first token: another greedy answer
    figures = teacher_forced_agreement(model, prompts, wrong)
    assert figures["identical_answers"] == 0 and figures["token_agreement"] < 1.0 and figures["max_logprob_gap"] > 0


def test_settings_validate_and_key_changes_with_them():
    assert ExportSettings().gguf_tolerance == 0.90
    assert ExportSettings(gguf_quantization="F16").gguf_quantization == "f16"
    assert ExportSettings(gguf_quantization="f32").gguf_tolerance == 1.0
    assert ExportSettings(gguf_min_agreement=0.5).gguf_tolerance == 0.5
    assert ExportSettings().key() != ExportSettings(gguf_quantization="bf16").key()
    for bad in ({"gguf_quantization": "q4_k_m"}, {"num_prompts": 0}, {"adapter_name": "a b"},
                {"merged": False, "adapter": False, "gguf_quantization": ""}, {"gguf_min_agreement": 1.5}):
        with pytest.raises(ValueError):
            ExportSettings(**bad)
