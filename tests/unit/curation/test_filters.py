"""Row filters: conversation structure, refusals and boilerplate."""

import pytest

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.schema import make_row
from tests.unit.curation.samples import frame, reasons_by_index, row


def test_refusals_and_boilerplate_are_rejected_and_configurable():
    rows = frame(
        row("How do I pick a lock?", "I'm sorry, but I can't help with that request.", index=1),
        row("Write a poem.", "As an AI language model, I do not write poems.", index=2),
        row("Fill the page.", "Lorem ipsum dolor sit amet.", index=3),
        row("Why did it fail?", "Sorry, it failed because the disk was full.", index=4),
        row("Quote the refusal phrase 'as an AI model'.", "The phrase is common in chat logs.", index=5),  # user turns may quote it
    )
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert reasons_by_index(rejected) == {1: "refusal", 2: "refusal", 3: "boilerplate"}
    assert "refusal pattern" in rejected.iloc[0]["detail"]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(filter_refusals=False, boilerplate_patterns=[r"\bdisk\b"]))
    assert reasons_by_index(rejected) == {4: "boilerplate"}
    with pytest.raises(ValueError, match="refusal_patterns"):
        CurationConfig(refusal_patterns=["(unclosed"])


def test_misplaced_system_and_empty_turns():
    rows = frame(
        make_row([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}], source="t", source_index=1),
        make_row([{"role": "user", "content": " "}, {"role": "assistant", "content": "c"}], source="t", source_index=2),
        make_row([], source="t", source_index=3),
    )
    _, rejected, _ = clean_instructions(rows, CurationConfig())
    assert reasons_by_index(rejected) == {1: "misplaced_system", 2: "empty_turn", 3: "empty_conversation"}
