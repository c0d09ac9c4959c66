"""Cleaning, deduplication and decontamination of canonical rows."""

import pandas as pd
import pytest

from sft_pipeline.curation import CurationConfig, clean_instructions, normalize_text
from sft_pipeline.ingest import rows_frame
from sft_pipeline.schema import make_row


def row(user, assistant, *, index=0, system=None, source="t"):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    return make_row(messages, source=source, source_file=f"{source}.jsonl", source_index=index)


def frame(*rows):
    return rows_frame(list(rows))


def test_normalize_text_nfkc_whitespace_markup_but_keeps_code_indentation():
    assert normalize_text("ｆｕｌｌ\u200bwidth  \r\n\r\n\r\n\r\nnext  ") == "fullwidth\n\nnext"
    assert normalize_text("Hello<br>there &amp; <b>you</b>  now") == "Hello\nthere & you now"
    code = "```python\ndef f():\n    return '<b>'\n```"
    assert normalize_text(code) == code


def test_every_row_is_kept_or_rejected_with_a_reason():
    rows = frame(
        row("Say hi", "Hi!", index=1),
        row("Say hi", "  hi!  ", index=2),  # exact duplicate after case/whitespace folding
        row("Empty answer", " \u200b ", index=3),
        row("Long", "x" * 20_000, index=4),
        make_row([{"role": "user", "content": "no answer"}], source="t", source_index=5),
        make_row([{"role": "assistant", "content": "no question"}], source="t", source_index=6),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig(near_dedup=False))
    assert list(kept["source_index"]) == [1]
    assert dict(zip(rejected["source_index"], rejected["reason"])) == {
        2: "exact_duplicate",
        3: "empty_response",
        4: "too_long",
        5: "no_final_assistant",
        6: "no_user_turn",
    }
    assert kept.iloc[0]["id"] in rejected.set_index("source_index").loc[2, "detail"]
    assert report.rows_in == len(kept) + len(rejected) == 6


def test_near_duplicates_removed_but_templated_prompts_with_different_answers_kept():
    base = "Explain why the sky looks blue during the day and red at sunset, in a few sentences for a curious child"
    answer = "Sunlight scatters off air molecules. Blue light scatters most, so the sky looks blue. At sunset light travels through more air and the blue is scattered away, leaving red and orange."
    rows = frame(
        row(base, answer, index=1),
        row(base + ".", answer + " Nice question!", index=2),  # near duplicate
        row("Translate 'good morning' to French.", "Bonjour.", index=3),
        row("Translate 'good morning' to Spanish.", "Buenos días.", index=4),  # templated prompt, different answer
    )
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert list(kept["source_index"]) == [1, 3, 4]
    assert list(rejected["reason"]) == ["near_duplicate"]
    assert kept.iloc[0]["id"] in rejected.iloc[0]["detail"]


def test_decontamination_rejects_rows_sharing_a_benchmark_ngram():
    question = "Which planet in the solar system has the largest number of confirmed moons orbiting around it as of today"
    rows = frame(row(f"Quiz: {question}?", "Saturn.", index=1), row("Name a gas giant.", "Jupiter.", index=2))
    kept, rejected, _ = clean_instructions(rows, CurationConfig(), benchmark_texts=[("q-42", question + "\nA. Mars")])
    assert list(kept["source_index"]) == [2]
    assert rejected.iloc[0]["reason"] == "benchmark_contamination"
    assert "q-42" in rejected.iloc[0]["detail"]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(decontamination_ngram=0), benchmark_texts=[("q-42", question)])
    assert len(kept) == 2


def test_survivor_is_deterministic_and_first_in_input_order():
    rows = frame(row("Say hi", "Hi!", index=1, source="a"), row("say HI", "hi!", index=2, source="b"))
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert list(kept["source"]) == ["a"] and list(rejected["source"]) == ["b"]


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="near_dedup_threshold"):
        CurationConfig(near_dedup_threshold=1.5)
    with pytest.raises(ValueError, match="max_conversation_chars"):
        CurationConfig(max_conversation_chars=0)


def test_empty_input_gives_empty_frames_with_schema():
    kept, rejected, report = clean_instructions(frame(), CurationConfig())
    assert kept.empty and rejected.empty and "messages" in kept.columns and "reason" in rejected.columns
    assert report.rows_in == 0
