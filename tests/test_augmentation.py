"""Self-Instruct augmentation: filters, the loop with a scripted teacher, and the local HF teacher."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_pipeline import schema
from sft_pipeline.augmentation import (
    BenchmarkOverlap,
    LocalHFTeacher,
    NoveltyFilter,
    SelfInstructConfig,
    Teacher,
    blacklisted_keyword,
    build_instruction_prompt,
    build_response_prompt,
    generate_synthetic_instructions,
    parse_instruction,
    response_problem,
    rouge_l_f1,
)

SEEDS = [
    ("Write a short poem about the sea.", "The sea is wide and grey and calm."),
    ("What is the capital of France?", "Paris."),
    ("List three ideas for a birthday party.", "A picnic, a treasure hunt, a movie night."),
    ("Summarize the paragraph in one sentence.", "It is about cats."),
    ("Classify the sentiment of this review as positive or negative.", "Positive."),
]


def seed_frame(extra_synthetic: bool = True) -> pd.DataFrame:
    rows = [
        schema.make_row([{"role": "user", "content": p}, {"role": "assistant", "content": r}], source="seed")
        for p, r in SEEDS
    ]
    if extra_synthetic:
        # Not a seed (origin synthetic), but still part of the pool a candidate must differ from.
        rows.append(schema.make_row(
            [{"role": "user", "content": "Explain how rainbows form in the sky."}, {"role": "assistant", "content": "Light."}],
            source="old_synth", origin="synthetic",
        ))
    return pd.DataFrame(rows)


class ScriptedTeacher:
    """Returns canned instruction lines in order; answers every instruction with a fixed reply."""

    name = "scripted"

    def __init__(self, instructions: list[str], answer: str | dict[str, str] = "A helpful, complete answer.") -> None:
        self.instructions = list(instructions)
        self.answer = answer
        self.calls: list[dict] = []
        self._next = 0

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        kind = "instruction" if "example tasks" in prompts[0][-1]["content"] else "response"
        self.calls.append({"kind": kind, "n": len(prompts), "seed": seed, "prompts": prompts})
        if kind == "response":
            if isinstance(self.answer, dict):
                return [self.answer.get(p[-1]["content"], "A helpful, complete answer.") for p in prompts]
            return [self.answer for _ in prompts]
        out = []
        for _ in prompts:
            out.append(self.instructions[self._next % len(self.instructions)] if self.instructions else "")
            self._next += 1
        return out


NOVEL = [
    "1. Give three tips for staying healthy during winter.",
    "Task: Translate the sentence 'good morning' into Spanish.",
    "2) Explain the difference between a virus and a bacterium.",
    '"Suggest a name for a bakery that sells vegan cakes."',
    "Describe the water cycle for a ten year old student.",
    "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
]


# ---------------------------------------------------------------- filters


def test_rouge_l_known_pairs():
    assert rouge_l_f1("The cat sat on the mat", "the cat sat on the mat.") == 1.0
    assert rouge_l_f1("apples and pears", "quantum chromodynamics lecture") == 0.0
    assert rouge_l_f1("", "anything") == 0.0
    # LCS("the cat sat on the mat", "the cat on a mat") = the cat on mat = 4; F1 = 2*4 / (6 + 5).
    assert rouge_l_f1("the cat sat on the mat", "the cat on a mat") == pytest.approx(8 / 11)
    # Symmetric.
    assert rouge_l_f1("the cat on a mat", "the cat sat on the mat") == pytest.approx(8 / 11)


def test_novelty_filter_rejects_near_copy_keeps_novel():
    f = NoveltyFilter([s for s, _ in SEEDS], threshold=0.7)
    novel, score, match = f.is_novel("Write a short poem about the ocean.")
    assert not novel and score > 0.7 and match == "Write a short poem about the sea."
    novel, score, _ = f.is_novel("Give three tips for staying healthy during winter.")
    assert novel and score <= 0.7
    f.add("Give three tips for staying healthy during winter.")
    assert not f.is_novel("give three tips for staying healthy during winter")[0]
    assert len(f) == len(SEEDS) + 1


def test_blacklist_word_boundaries():
    assert blacklisted_keyword("Draw a diagram of a cell.") == "draw"
    assert blacklisted_keyword("How do I withdraw money from an ATM?") is None
    assert blacklisted_keyword("Go  to the nearest shop and buy milk.") == "go to"
    assert blacklisted_keyword("Let's go together to the park.") is None
    assert blacklisted_keyword("Describe the MAPS of Europe.") == "maps"
    assert blacklisted_keyword("Explain object mapping in software.") is None


def test_benchmark_overlap_13gram_hit_and_miss():
    q = ("Which of the following statements best describes the reason why the sky appears blue "
         "to an observer on the surface of the Earth during the day?")
    bench = BenchmarkOverlap([q], rouge_threshold=0.7)
    # 13 consecutive words copied from the question, embedded in otherwise different text.
    copied = "Please tell me the reason why the sky appears blue to an observer on the surface of the Earth, briefly."
    hit = bench.check(copied)
    assert hit and "13-gram" in hit
    assert bench.check("Explain why the sky is blue.") is None
    # Near-identical but shorter than 13 words: caught by ROUGE instead.
    short = BenchmarkOverlap(["What is the boiling point of water?"], rouge_threshold=0.7)
    assert "ROUGE-L" in short.check("What is the boiling point of water")
    assert BenchmarkOverlap([]).check(copied) is None


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


def test_response_problem_codes():
    assert response_problem("Do x", "", 2)[0] == "empty_response"
    assert response_problem("Do x", "a", 2)[0] == "empty_response"
    assert response_problem("Name a colour.", "name a  colour.", 2)[0] == "non_answer"
    assert response_problem("Name a colour.", "I'm sorry, I cannot help.", 2)[0] == "non_answer"
    assert response_problem("Name a colour.", "As an AI, I have no eyes.", 2)[0] == "non_answer"
    assert response_problem("Name a colour.", "Blue.", 2) is None


def test_prompts_are_chat_messages():
    msgs = build_instruction_prompt(["Write a poem.", "Multi\nline   task."])
    assert msgs[0]["role"] == "user" and "1. Write a poem." in msgs[0]["content"]
    assert "2. Multi line task." in msgs[0]["content"]
    assert build_response_prompt("Do x.") == [{"role": "user", "content": "Do x."}]


def test_config_validation_names_field():
    SelfInstructConfig(num_instructions=0, max_attempts=0)
    for kwargs, name in [
        ({"num_instructions": -1}, "num_instructions"),
        ({"batch_size": 0}, "batch_size"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"rouge_threshold": 1.5}, "rouge_threshold"),
        ({"max_attempts": 1}, "max_attempts"),
        ({"min_instruction_words": 10, "max_instruction_words": 5}, "max_instruction_words"),
        ({"seed_tasks_per_prompt": 0}, "seed_tasks_per_prompt"),
    ]:
        with pytest.raises(ValueError, match=name):
            SelfInstructConfig(**kwargs)
    assert "num_instructions" in SelfInstructConfig.help()


# ---------------------------------------------------------------- the loop


def test_loop_reaches_target_with_provenance():
    teacher = ScriptedTeacher(NOVEL)
    assert isinstance(teacher, Teacher)
    cfg = SelfInstructConfig(num_instructions=4, batch_size=2, max_attempts=20)
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    assert len(acc) == 4 and stats["accepted"] == 4
    assert (acc["origin"] == "synthetic").all() and (acc["source"] == "self_instruct").all()
    for col in (*schema.ROW_COLUMNS, "teacher", "seed_ids", "generation_params", "rouge_l_max"):
        assert col in acc.columns
    human_ids = set(seed_frame()["id"])
    for _, row in acc.iterrows():
        assert row["id"] == schema.conversation_id(row["messages"])
        assert row["messages"][-1]["role"] == "assistant"
        assert row["teacher"] == "scripted"
        assert isinstance(row["seed_ids"], list) and all(isinstance(s, str) for s in row["seed_ids"])
        assert 1 <= len(row["seed_ids"]) <= cfg.seed_tasks_per_prompt
        params = json.loads(row["generation_params"])
        assert params["temperature"] == cfg.temperature and "instruction_seed" in params
        assert 0.0 <= row["rouge_l_max"] <= cfg.rouge_threshold
    # The first prompt can only show human seeds (nothing synthetic was accepted yet).
    assert set(acc.iloc[0]["seed_ids"]) <= human_ids
    # Numbering, quotes and the "Task:" label were stripped before the row was made.
    assert acc.iloc[0]["prompt"] == "Give three tips for staying healthy during winter."
    assert acc.iloc[1]["prompt"] == "Translate the sentence 'good morning' into Spanish."
    assert rej.empty and stats["rejected_by_reason"] == {}
    assert stats["attempts"] == len(teacher.calls) == 4  # 2 rounds x (instructions + responses)


def test_loop_rejects_with_reasons():
    script = [
        "Write a short poem about the sea.",                            # exact copy of a seed
        "Write a short poem about the ocean.",                          # near copy of a seed
        "Draw a diagram of the solar system.",                          # blacklisted
        "Hi there",                                                     # too short
        "Explain how rainbows form in the sky!",                        # duplicate of a non-seed pool row
        "Give three tips for staying healthy during winter.",           # accepted
        "Give three tips for staying healthy during winter.",           # duplicate of the one above
        "Please tell me the reason why the sky appears blue to an observer on the surface of the Earth.",
        "Describe the water cycle for a ten year old student.",         # answered with a refusal
        "Name three famous painters from the Renaissance period.",      # answered with an empty string
        "Convert 100 degrees Fahrenheit to Celsius and show the steps.",  # accepted
        "",                                                             # empty
    ]
    answers = {
        "Describe the water cycle for a ten year old student.": "I'm sorry, but I cannot do that.",
        "Name three famous painters from the Renaissance period.": "   ",
    }
    bench = ["Which of the following best describes the reason why the sky appears blue to an observer "
             "on the surface of the Earth during the day?"]
    teacher = ScriptedTeacher(script, answer=answers)
    cfg = SelfInstructConfig(num_instructions=3, batch_size=4, max_attempts=6)
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg, benchmark_questions=bench)

    assert list(acc["prompt"]) == [
        "Give three tips for staying healthy during winter.",
        "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
    ]
    assert stats["stopped"] == "budget_exhausted"
    by_raw = {r["raw"]: r["reason"] for _, r in rej.iterrows() if r["reason"] not in ("empty_response", "non_answer")}
    assert by_raw[script[0]] == "exact_duplicate"
    assert by_raw[script[1]] == "too_similar"
    assert by_raw[script[2]] == "blacklisted_keyword"
    assert by_raw[script[3]] == "too_short"
    assert by_raw[script[4]] == "too_similar"  # differs only by punctuation: ROUGE-L 1.0
    assert by_raw[script[7]] == "benchmark_overlap"
    assert by_raw[""] == "empty_instruction"
    reasons = list(rej["reason"])
    assert reasons.count("exact_duplicate") == 2  # script[0] and the repeated accepted one
    assert "non_answer" in reasons and "empty_response" in reasons
    assert (rej["stage"] == "augmentation").all() and (rej["source"] == "self_instruct").all()
    assert set(rej.columns) == set(schema.REJECT_COLUMNS)
    # Response-stage rejects carry the conversation id; their raw text holds instruction and response.
    refused = rej[rej["reason"] == "non_answer"].iloc[0]
    assert refused["id"] and json.loads(refused["raw"])["instruction"] == script[8]
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"] == len(rej)
    assert stats["candidates"] == stats["accepted"] + stats["rejected"] == len(script)


def test_loop_is_deterministic_and_seed_sensitive():
    cfg = SelfInstructConfig(num_instructions=3, batch_size=2, seed=7)
    a1, r1, s1 = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg)
    a2, r2, s2 = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg)
    pd.testing.assert_frame_equal(a1, a2)
    pd.testing.assert_frame_equal(r1, r2)
    assert s1 == s2
    other = SelfInstructConfig(num_instructions=3, batch_size=2, seed=8)
    t1, t3 = ScriptedTeacher(NOVEL), ScriptedTeacher(NOVEL)
    generate_synthetic_instructions(seed_frame(), t1, cfg)
    generate_synthetic_instructions(seed_frame(), t3, other)
    assert [c["seed"] for c in t1.calls] != [c["seed"] for c in t3.calls]


def test_zero_target_makes_no_teacher_call():
    class Exploding:
        name = "boom"

        def generate(self, *args, **kwargs):
            raise AssertionError("teacher must not be called")

    acc, rej, stats = generate_synthetic_instructions(seed_frame(), Exploding(), SelfInstructConfig(num_instructions=0))
    assert acc.empty and rej.empty and stats["attempts"] == 0
    assert "id" in acc.columns and "reason" in rej.columns


def test_max_attempts_bounds_calls():
    # Every candidate is a seed copy, so the target is never reached and only the budget stops the loop.
    teacher = ScriptedTeacher([SEEDS[0][0]])
    cfg = SelfInstructConfig(num_instructions=5, max_attempts=4, batch_size=2)
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    # A round starts only while 2 calls remain (instructions + their responses), so the last call stays unused.
    assert acc.empty and len(teacher.calls) == 3 == stats["attempts"]
    assert stats["stopped"] == "budget_exhausted"
    assert set(rej["reason"]) == {"exact_duplicate"} and len(rej) == 6

    # With responses needed, a round costs two calls and never goes past the budget.
    teacher = ScriptedTeacher(NOVEL, answer="   ")
    cfg = SelfInstructConfig(num_instructions=50, max_attempts=5, batch_size=1)
    _, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    assert len(teacher.calls) == stats["attempts"] == 4
    assert set(rej["reason"]) == {"empty_response"}


def test_no_human_seeds_is_an_error():
    only_synth = seed_frame()
    only_synth["origin"] = "synthetic"
    with pytest.raises(ValueError, match="human"):
        generate_synthetic_instructions(only_synth, ScriptedTeacher(NOVEL), SelfInstructConfig())


def test_examples_shown_to_teacher_come_from_the_pool():
    teacher = ScriptedTeacher(NOVEL)
    cfg = SelfInstructConfig(num_instructions=6, batch_size=2, seed_tasks_per_prompt=4)
    acc, _, _ = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    first = teacher.calls[0]["prompts"][0][0]["content"]
    shown = [line.split(". ", 1)[1] for line in first.splitlines() if line[:1].isdigit()]
    assert len(shown) == 4 and set(shown) <= {s for s, _ in SEEDS}
    # Later prompts may mix in one accepted synthetic task (k // 4), never more.
    synthetic_ids = set(acc["id"])
    for _, row in acc.iterrows():
        assert len(set(row["seed_ids"]) & synthetic_ids) <= 1


# ---------------------------------------------------------------- the local HF teacher


def test_local_hf_teacher_batch_and_determinism(tiny_model_dir):
    teacher = LocalHFTeacher(tiny_model_dir)
    assert isinstance(teacher, Teacher) and teacher.name
    prompts = [build_instruction_prompt(["Write a poem.", "Name a city."]), build_response_prompt("Hi")]
    out1 = teacher.generate(prompts, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=3)
    out2 = teacher.generate(prompts, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=3)
    assert len(out1) == 2 and all(isinstance(o, str) for o in out1)
    assert out1 == out2
    assert not any("<|im_end|>" in o or "<|im_start|>" in o for o in out1)
    greedy = teacher.generate(prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    assert greedy == teacher.generate(prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=99)


def test_loop_runs_end_to_end_on_tiny_model(tiny_model_dir):
    # The random model writes gibberish: the point is that the loop runs and accounts for every candidate.
    teacher = LocalHFTeacher(tiny_model_dir, name="tiny")
    cfg = SelfInstructConfig(num_instructions=2, max_attempts=4, batch_size=2,
                             max_new_tokens_instruction=12, max_new_tokens_response=12, min_instruction_words=1)
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    assert stats["attempts"] <= 4
    assert stats["candidates"] >= stats["accepted"] + stats["rejected"]
    assert len(acc) == stats["accepted"] and len(rej) == stats["rejected"]
    if len(acc):
        assert (acc["teacher"] == "tiny").all()
