"""MMLU prompts as lm-evaluation-harness builds them: plain text, or chat turns through the tokenizer's template."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

PROMPT_FORMATS = ("plain", "chat")


def mmlu_description(subject: str) -> str:
    """The harness's task description (first line of every prompt, system turn in chat mode)."""
    topic = " ".join(str(subject).split("_"))
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def format_mmlu_question(question: str, choices: Sequence[str]) -> str:
    """The harness's `doc_to_text`: question, the four lettered choices, then "Answer:"."""
    if len(choices) != 4:
        raise ValueError(f"MMLU questions have 4 choices, got {len(choices)}")
    a, b, c, d = choices
    return f"{str(question).strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def format_mmlu_prompt(
    subject: str, question: str, choices: Sequence[str], shots: Sequence[tuple[str, Sequence[str], str]] = ()
) -> str:
    """The prompt of lm-evaluation-harness's `mmlu` task, byte for byte (plain-text mode).

    `shots`: (question, choices, answer letter) examples, rendered as the harness renders
    few-shot examples: `doc_to_text + " " + letter + "\\n\\n"` each, after the description.
    """
    examples = "".join(f"{format_mmlu_question(q, c)} {a}\n\n" for q, c, a in shots)
    return mmlu_description(subject) + examples + format_mmlu_question(question, choices)


def mmlu_chat_messages(
    subject: str, question: str, choices: Sequence[str], shots: Sequence[tuple[str, Sequence[str], str]] = ()
) -> list[dict[str, str]]:
    """The harness's chat-template messages (`apply_chat_template=True`, few-shot as multi-turn):
    the description as system turn, each example a user turn plus an assistant turn holding the
    letter, the question as the last user turn."""
    messages = [{"role": "system", "content": mmlu_description(subject)}]
    for q, c, a in shots:
        messages += [{"role": "user", "content": format_mmlu_question(q, c)}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": format_mmlu_question(question, choices)})
    return messages


def shots_by_subject(fewshot: pd.DataFrame | None) -> dict[str, list[tuple[str, list[str], str]]]:
    """subject -> its (question, choices, answer) examples in prompt order (`shot`)."""
    if fewshot is None or len(fewshot) == 0:
        return {}
    frame = fewshot.sort_values(["subject", "shot"], kind="stable") if "shot" in fewshot.columns else fewshot
    out: dict[str, list[tuple[str, list[str], str]]] = {}
    for subject, question, choices, answer in zip(frame["subject"], frame["question"], frame["choices"], frame["answer"]):
        out.setdefault(str(subject), []).append((str(question), [str(c) for c in choices], str(answer)))
    return out


def shared_prefix_groups(questions: pd.DataFrame) -> list[list[int]]:
    """Positions (0-based, in `questions` order) of the questions whose prompts begin with the same text.

    Every prompt of a subject starts with the same description, the same k-shot examples in the
    same order and, in chat mode, the same template header and turns: everything before the
    question. One group per subject, in order of first appearance. Scoring runs the tokens these
    prompts share once per group and reuses their key/value cache for every question of it.
    """
    groups: dict[str, list[int]] = {}
    for position, subject in enumerate(questions["subject"]):
        groups.setdefault(str(subject), []).append(position)
    return list(groups.values())


def build_mmlu_contexts(
    tokenizer: Any, questions: pd.DataFrame, fewshot: pd.DataFrame | None = None, prompt_format: str = "plain"
) -> list[str]:
    """The text each question is scored after, in `questions` order.

    plain: `format_mmlu_prompt` (ends with "Answer:"; continuations " A".." D").
    chat: the tokenizer's chat template over `mmlu_chat_messages` with the generation prompt
    (continuations "A".."D"), as the harness builds it with `apply_chat_template=True`.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    shots = shots_by_subject(fewshot)
    rows = zip(questions["subject"], questions["question"], questions["choices"])
    if prompt_format == "plain":
        return [format_mmlu_prompt(s, q, list(c), shots.get(str(s), ())) for s, q, c in rows]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format='chat' needs a tokenizer with a chat template")
    return [
        tokenizer.apply_chat_template(mmlu_chat_messages(s, q, list(c), shots.get(str(s), ())),
                                      tokenize=False, add_generation_prompt=True)
        for s, q, c in rows
    ]
