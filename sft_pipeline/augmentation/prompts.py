"""The prompts a teacher is sent: new instructions from k examples, inputs, output-first instances, answers."""

from __future__ import annotations

import re

# Bumped whenever the prompt wording or the loop changes, so provenance tells which prompt made a row
# and cached generations from an older loop are not reused.
PROMPT_VERSION = "self_instruct_v2"


def one_line(text: str, limit: int = 200) -> str:
    """`text` on one line (whitespace runs folded), cut to `limit` characters with "..."."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def build_instruction_prompt(example_tasks: list[str], num_new: int = 1) -> list[dict[str, str]]:
    """A user message listing the k example tasks and asking for `num_new` new, different tasks."""
    examples = "\n".join(f"{i}. {one_line(t)}" for i, t in enumerate(example_tasks, 1))
    if num_new == 1:
        ask = (
            "Write one new task that is different from all of the examples above. "
            "Reply with the task only, on a single line."
        )
    else:
        first = len(example_tasks) + 1
        ask = (
            f"Write {num_new} new tasks that are different from all of the examples above and from each other "
            "(vary the topic and the kind of task: questions, writing, rewriting, classification, reasoning, code). "
            f"Reply with the tasks only, one per line, numbered {first} to {first + num_new - 1}."
        )
    return [{"role": "user", "content": f"Here are some example tasks:\n{examples}\n\n{ask}"}]


def build_input_prompt(instruction: str) -> list[dict[str, str]]:
    """Input-first instance generation: ask for an input the task works on, or <noinput>."""
    content = (
        f"Task: {instruction}\n\n"
        "If this task needs an input to work on (a text, a sentence, a list, a piece of code, a table), "
        "write one realistic input for it. If the task is complete without an input, reply exactly <noinput>. "
        "Reply with the input only."
    )
    return [{"role": "user", "content": content}]


def build_output_first_prompt(instruction: str) -> list[dict[str, str]]:
    """Output-first instance generation for classification tasks: a class label, then an input of that class."""
    content = (
        f"Task: {instruction}\n\n"
        "This is a classification task. Pick one of its possible class labels, then write an input that "
        "belongs to that class. Reply in exactly this form:\nClass label: <label>\nInput: <input>"
    )
    return [{"role": "user", "content": content}]


def build_response_prompt(instruction: str, input_text: str = "") -> list[dict[str, str]]:
    """The instruction (and its input, after a blank line) as a single user turn."""
    content = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": content}]


_CLASSIFICATION_RE = re.compile(
    r"\b(?:classify|classification|categori[sz]e|categori[sz]ation|which\s+(?:of\s+the\s+following\s+)?categor(?:y|ies)"
    r"|what\s+category|label\s+(?:the|each|this|these|it)|true\s+or\s+false|yes\s+or\s+no"
    r"|(?:determine|decide|tell|identify|detect|check)\s+(?:whether|if)"
    r"|positive\s+or\s+negative|positive,\s+negative|spam\s+or|fact\s+or\s+opinion|is\s+(?:it|this|the\s+following)\s+\w+\s+or\s+\w+)\b",
    re.IGNORECASE,
)


def is_classification_task(instruction: str) -> bool:
    """Whether a task has a small, fixed set of output labels (and so is generated output-first).

    Self-Instruct asks the LM this with few-shot examples; a keyword rule is used here instead: it
    costs no call, and small teachers answer the question no better than chance.
    """
    return bool(_CLASSIFICATION_RE.search(str(instruction)))


__all__ = [
    "PROMPT_VERSION", "one_line", "build_instruction_prompt", "build_input_prompt", "build_output_first_prompt",
    "build_response_prompt", "is_classification_task",
]
