"""Teacher prompts and the classification-task rule that picks output-first instances."""

from __future__ import annotations

from sft_pipeline.augmentation.prompts import (
    build_input_prompt,
    build_instruction_prompt,
    build_output_first_prompt,
    build_response_prompt,
    is_classification_task,
)


def test_classification_detection():
    for text in ["Classify the sentiment of this tweet.", "Is this email spam or not spam?",
                 "Determine whether the number is prime.", "Answer true or false: the sun is a star.",
                 "Which category does this product belong to?"]:
        assert is_classification_task(text), text
    for text in ["Write a poem about spring.", "Explain how a bicycle works.", "Summarize the article."]:
        assert not is_classification_task(text), text


def test_prompts_are_chat_messages():
    msgs = build_instruction_prompt(["Write a poem.", "Multi\nline   task."])
    assert msgs[0]["role"] == "user" and "1. Write a poem." in msgs[0]["content"]
    assert "2. Multi line task." in msgs[0]["content"]
    many = build_instruction_prompt([f"Task {i}." for i in range(8)], num_new=3)[0]["content"]
    assert "numbered 9 to 11" in many and "8. Task 7." in many
    assert build_response_prompt("Do x.") == [{"role": "user", "content": "Do x."}]
    assert build_response_prompt("Do x.", "some input") == [{"role": "user", "content": "Do x.\n\nsome input"}]
    assert "<noinput>" in build_input_prompt("Do x.")[0]["content"]
    assert "Class label:" in build_output_first_prompt("Classify x.")[0]["content"]
