"""Row filters: conversation structure, refusals and boilerplate."""

import json

import pytest

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.schema import make_row
from tests.unit.curation.samples import frame, long_text, reasons_by_index, row


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


def _turns(*roles, seed=0):
    return [{"role": r, "content": long_text(seed * 1000 + i, 12)} for i, r in enumerate(roles)]


def test_turn_orders_the_clean_suite_rejects_are_quarantined_with_a_reason():
    rows = frame(
        make_row(_turns("user", "user", "assistant", seed=1), source="t", source_index=1),
        make_row(_turns("assistant", "user", "assistant", seed=2), source="t", source_index=2),
        make_row(_turns("system", "assistant", "user", "assistant", seed=3), source="t", source_index=3),
        make_row(_turns("user", "assistant", "assistant", seed=4), source="t", source_index=4),
        make_row(_turns(*("user", "assistant") * 101, seed=5), source="t", source_index=5),  # 202 turns
        make_row(_turns("system", "user", "assistant", "user", "assistant", seed=6), source="t", source_index=6),
    )
    kept, rejected, _ = clean_instructions(rows, CurationConfig(max_conversation_chars=100_000, max_conversation_tokens=0))
    assert reasons_by_index(rejected) == {1: "role_order", 2: "assistant_first", 3: "assistant_first", 4: "role_order", 5: "too_many_turns"}
    details = dict(zip(rejected["source_index"], rejected["detail"]))
    assert "turns 0 and 1" in details[1] and "202 turns" in details[5] and "200" in details[5]
    assert kept["source_index"].tolist() == [6]


def test_every_kept_row_passes_the_clean_suites_row_rules():
    import re

    from sft_pipeline.curation.expectations import conversation_view, suite_path

    spec = json.loads(suite_path("clean_instructions").read_text())
    regex = next(e["kwargs"]["regex"] for e in spec["expectations"] if e["kwargs"].get("column") == "role_sequence")
    orders = [("user", "user", "assistant"), ("assistant", "user", "assistant"), ("user", "assistant", "user"),
              ("user", "assistant", "assistant"), ("system", "user", "assistant"), ("user", "assistant", "user", "assistant")]
    rows = frame(*[make_row(_turns(*o, seed=i), source="t", source_index=i) for i, o in enumerate(orders)])
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert len(kept) + len(rejected) == len(orders)
    assert all(re.fullmatch(regex, seq) for seq in conversation_view(kept)["role_sequence"])
    assert len(kept) == 2


def test_max_turns_is_configurable_and_validated():
    rows = frame(make_row(_turns(*("user", "assistant") * 3), source="t", source_index=1))
    _, rejected, _ = clean_instructions(rows, CurationConfig(max_turns=4))
    assert reasons_by_index(rejected) == {1: "too_many_turns"}
    kept, _, _ = clean_instructions(rows, CurationConfig(max_turns=6))
    assert len(kept) == 1
    with pytest.raises(ValueError, match="max_turns"):
        CurationConfig(max_turns=1)
