"""Token counting (a tokenizer or the regex estimate) and the length bounds it drives."""

import pytest

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.curation.tokens import approx_token_count
from tests.unit.curation.samples import frame, reasons_by_index, row


def test_length_bounds_in_characters_and_tokens(tiny_model_dir):
    rows = frame(
        row("Hi", "Yo", index=1),  # 4 characters: fine
        row("Q", "A", index=2),  # 2 characters, 2 tokens
        row("Explain", "word " * 50, index=3),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig(min_conversation_chars=3, max_conversation_tokens=40))
    assert reasons_by_index(rejected) == {2: "too_short", 3: "too_many_tokens"}
    assert report.token_counter == "approx" and report.kept_tokens == [2]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(min_conversation_tokens=3, max_conversation_tokens=0))
    assert reasons_by_index(rejected) == {1: "too_few_tokens", 2: "too_few_tokens"}
    # A real tokenizer (a local folder) counts instead of the estimate.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = len(tokenizer("Explain\n" + ("word " * 50).strip(), add_special_tokens=False)["input_ids"])
    kept, rejected, report = clean_instructions(rows, CurationConfig(tokenizer=str(tiny_model_dir), max_conversation_tokens=expected - 1))
    assert report.token_counter == str(tiny_model_dir)
    assert reasons_by_index(rejected) == {3: "too_many_tokens"} and f"has {expected} tokens" in rejected.iloc[0]["detail"]
    with pytest.raises(ValueError, match="tokenizer 'no/such-tokenizer-here'"):
        clean_instructions(rows, CurationConfig(tokenizer="no/such-tokenizer-here"))


def test_approx_token_count_is_close_to_word_pieces():
    assert approx_token_count("Hello, world!") == 4
    assert approx_token_count("internationalization") == 4  # 20 letters in pieces of 6
    assert approx_token_count("") == 0
