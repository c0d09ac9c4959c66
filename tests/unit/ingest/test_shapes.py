"""Detecting every input shape and mapping records to messages, forced shapes and column mappings included."""

import pytest

from sft_pipeline.ingest.shapes import detect_shape, to_messages
from sft_pipeline.ingest.sources import SourceSpec, load_sources
from tests.unit.ingest.samples import ALPACA, DOLLY, MESSAGES, PROMPT_COMPLETION, SHAREGPT, write_jsonl


@pytest.mark.parametrize(
    "record, shape, expected",
    [
        (ALPACA, "alpaca", [("user", "Name a prime number."), ("assistant", "Seven is prime.")]),
        (DOLLY, "dolly", [("user", "Who wrote it?\n\nThe memo was written by Ana."), ("assistant", "Ana wrote it.")]),
        (SHAREGPT, "sharegpt", [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]),
        (MESSAGES, "messages", [("user", "2+2?"), ("assistant", "4")]),
        (PROMPT_COMPLETION, "prompt_completion", [("user", "Translate 'gato' to English."), ("assistant", "cat")]),
    ],
)
def test_every_shape_is_detected_and_mapped(record, shape, expected):
    assert detect_shape(record) == shape
    assert [(m["role"], m["content"]) for m in to_messages(record, "auto")] == expected


def test_shape_forced_and_column_mapping_for_every_shape(tmp_path):
    records = [
        ({"q": "Name a prime.", "ctx": "", "a": "Two."}, "alpaca", {"instruction": "q", "input": "ctx", "output": "a"}),
        ({"task": "Who wrote it?", "text": "Ana wrote it.", "answer": "Ana."}, "dolly", {"instruction": "task", "context": "text", "response": "answer"}),
        ({"dialog": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "sharegpt", {"conversations": "dialog"}),
        ({"turns": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "messages", {"messages": "turns"}),
        ({"question": "Capital of Peru?", "answer": "Lima."}, "prompt_completion", {"prompt": "question", "completion": "answer"}),
    ]
    specs = []
    for i, (record, shape, columns) in enumerate(records):
        path = write_jsonl(tmp_path / f"s{i}.jsonl", [record])
        specs.append(SourceSpec(str(path), shape=shape, columns=columns))
    result = load_sources(specs)
    assert result.rejected.empty, result.rejected
    assert [m[-1]["content"] for m in result.rows["messages"]] == ["Two.", "Ana.", "Hello", "4", "Lima."]
    # A forced shape that does not fit the record is a missing field, not a crash.
    path = write_jsonl(tmp_path / "wrong.jsonl", [DOLLY])
    rejected = load_sources([SourceSpec(str(path), shape="sharegpt")]).rejected
    assert list(rejected["reason"]) == ["missing_field"]
