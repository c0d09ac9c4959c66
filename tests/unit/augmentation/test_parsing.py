"""Reading teacher replies: instruction lines, inputs, output-first instances."""

from __future__ import annotations

from sft_pipeline.augmentation.parsing import parse_input, parse_instruction, parse_instructions, parse_output_first


def test_parse_instruction_strips_decorations():
    assert parse_instruction("1. Write a haiku about autumn.") == "Write a haiku about autumn."
    assert parse_instruction('\n\n  2) "Name three rivers in Africa."\nsecond line') == "Name three rivers in Africa."
    assert parse_instruction("Task: Summarize the article.") == "Summarize the article."
    assert parse_instruction("New task 5: **Translate to French.**") == "Translate to French."
    assert parse_instruction("- (3) Instruction: 'List fruits.'") == "List fruits."
    assert parse_instruction("1.5 liters of water: how many cups?") == "1.5 liters of water: how many cups?"
    assert parse_instruction("   \n ") == ""
    # Lead-ins small chat models like to write before the task.
    assert parse_instruction("Sure! Here's a new task:\n\n1. Write a limerick.") == "Write a limerick."
    assert parse_instruction("Here is a new task: Plan a trip to Rome.") == "Plan a trip to Rome."
    assert parse_instruction("Here's a new task:") == ""
    assert parse_instruction("Great Wall facts: list five.") == "Great Wall facts: list five."


def test_parse_multiple_instructions_from_one_reply():
    reply = "Here are two new tasks:\n9. Write a haiku about rain.\n10) Name three rivers in Africa.\n11. Extra task."
    assert parse_instructions(reply, limit=2) == ["Write a haiku about rain.", "Name three rivers in Africa."]
    assert parse_instructions(reply) == ["Write a haiku about rain.", "Name three rivers in Africa.", "Extra task."]
    assert parse_instructions("1. Same task.\n2. same task.") == ["Same task."]
    assert parse_instructions("") == []


def test_parse_input_and_output_first():
    assert parse_input("<noinput>") == ""
    assert parse_input("Input: No input needed.") == ""
    assert parse_input("None") == ""
    assert parse_input("Input: The quick brown fox.\nOutput: A fox.") == "The quick brown fox."
    assert parse_input("def f(x):\n    return x") == "def f(x):\n    return x"
    assert parse_output_first("Class label: Positive\nInput: Great film!") == ("Positive", "Great film!")
    assert parse_output_first("**Class label:** Spam\nInput:\nWin a prize now\nclick here") == ("Spam", "Win a prize now\nclick here")
    assert parse_output_first("Class label: True\nInput: <noinput>") == ("True", "")
    assert parse_output_first("I think it is positive.") is None
