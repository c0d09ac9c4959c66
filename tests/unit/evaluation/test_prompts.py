"""Harness prompts: plain text and chat turns, zero- and few-shot."""

from sft_pipeline.evaluation.prompts import format_mmlu_prompt, mmlu_chat_messages


def test_prompt_matches_lm_eval_harness():
    prompt = format_mmlu_prompt("high_school_biology", "  What is DNA?\n", ["a", "b", "c", "d"])
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What is DNA?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


SHOTS = [("1+1?", ["1", "2", "3", "4"], "B"), ("Red planet?", ["Venus", "Mars", "Moon", "Sun"], "B")]


def test_fewshot_prompt_is_the_harness_one():
    prompt = format_mmlu_prompt("astronomy", "Q?", ["a", "b", "c", "d"], SHOTS)
    assert prompt == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Red planet?\nA. Venus\nB. Mars\nC. Moon\nD. Sun\nAnswer: B\n\n"
        "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    messages = mmlu_chat_messages("astronomy", "Q?", ["a", "b", "c", "d"], SHOTS[:1])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].endswith("about astronomy.\n\n") and messages[2]["content"] == "B"
    assert messages[3]["content"] == "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
