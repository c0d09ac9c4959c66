"""Self-Instruct augmentation: filters and the candidate index, prompts and parsing, the loop with a
scripted teacher, the journal (resume and reuse), the HTTP teacher against a loopback server, the
local HF teacher, mixing, and the asset called directly."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pandas as pd
import pytest

from sft_pipeline import schema
from sft_pipeline.augmentation import (
    FILTERS,
    BenchmarkOverlap,
    GenerationJournal,
    LocalHFTeacher,
    NoveltyFilter,
    SelfInstructConfig,
    Teacher,
    blacklisted_keyword,
    build_input_prompt,
    build_instruction_prompt,
    build_output_first_prompt,
    build_response_prompt,
    generate_synthetic_instructions,
    is_classification_task,
    mix_human_and_synthetic,
    parse_input,
    parse_instruction,
    parse_instructions,
    parse_output_first,
    response_problem,
    rouge_l_f1,
    tokenize,
)
from sft_pipeline.teachers import OpenAICompatibleTeacher, TeacherConfig, TeacherError, build_teacher, teacher_identity

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


def prompt_kind(prompt: list[dict]) -> str:
    text = prompt[-1]["content"]
    if text.startswith("Here are some example tasks"):
        return "instruction"
    if "This is a classification task" in text:
        return "output_first"
    if "reply exactly <noinput>" in text:
        return "input"
    return "response"


class ScriptedTeacher:
    """Canned instruction replies in order; inputs, labels and answers from small rules or dicts."""

    name = "scripted"

    def __init__(self, instructions: list[str], answer: str | dict[str, str] = "A helpful, complete answer.",
                 inputs: dict[str, str] | None = None, fail_on_call: int | None = None) -> None:
        self.instructions = list(instructions)
        self.answer = answer
        self.inputs = inputs or {}
        self.fail_on_call = fail_on_call
        self.calls: list[dict] = []
        self._next = 0

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("teacher went away")
        kinds = [prompt_kind(p) for p in prompts]
        self.calls.append({"kinds": kinds, "n": len(prompts), "seed": seed, "prompts": prompts, "max_new_tokens": max_new_tokens})
        out = []
        for kind, p in zip(kinds, prompts):
            text = p[-1]["content"]
            if kind == "instruction":
                out.append(self.instructions[self._next % len(self.instructions)] if self.instructions else "")
                self._next += 1
            elif kind == "input":
                task = text.split("\n", 1)[0].removeprefix("Task: ")
                out.append(self.inputs.get(task, "<noinput>"))
            elif kind == "output_first":
                out.append("Class label: Positive\nInput: I loved every minute of this film.")
            elif isinstance(self.answer, dict):
                out.append(self.answer.get(text.split("\n\n")[0], "A helpful, complete answer."))
            else:
                out.append(self.answer)
        return out


NOVEL = [
    "1. Give three tips for staying healthy during winter.",
    "Task: Translate the sentence 'good morning' into Spanish.",
    "2) Explain the difference between a virus and a bacterium.",
    '"Suggest a name for a bakery that sells vegan cakes."',
    "Describe the water cycle for a ten year old student.",
    "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
    "Write a limerick about a forgetful robot.",
    "Name four planets and one fact about each.",
]


def small_cfg(**kw) -> SelfInstructConfig:
    base = dict(num_instructions=4, batch_size=2, max_attempts=30, new_tasks_per_prompt=1, seed_tasks_per_prompt=4,
                synthetic_tasks_per_prompt=1)
    base.update(kw)
    return SelfInstructConfig(**base)


# ---------------------------------------------------------------- filters and the candidate index


def _dp_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _reference_f1(a: str, b: str) -> float:
    # rouge-score's _score_lcs, written out: precision over the prediction, recall over the target.
    ta, tb = tokenize(a), tokenize(b)
    if not ta or not tb:
        return 0.0
    lcs = _dp_lcs(ta, tb)
    p, r = lcs / len(tb), lcs / len(ta)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ("a the of to write explain list give three tips for how why what is are cat dog sea poem story "
             "code python summarize classify sentence review positive negative short long about").split()
    texts = []
    for _ in range(n):
        if texts and rng.random() < 0.4:  # a near copy of an earlier text
            words = rng.choice(texts).split()
            for _ in range(rng.randint(0, 3)):
                i = rng.randrange(len(words) + 1)
                if rng.random() < 0.5 and words:
                    words.pop(min(i, len(words) - 1))
                else:
                    words.insert(i, rng.choice(vocab))
            texts.append(" ".join(words) or "empty")
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 16))))
    return texts


def test_tokenizer_and_f1_match_rouge_score_definition():
    assert tokenize("Don't STOP—believing, 2 times!") == ["don", "t", "stop", "believing", "2", "times"]
    texts = _random_texts(300, seed=5)
    for a, b in zip(texts, reversed(texts)):
        assert rouge_l_f1(a, b) == _reference_f1(a, b)  # bit-identical, not approx


@pytest.mark.parametrize("threshold", [0.0, 0.7, 1.0])
def test_candidate_index_keeps_exactly_the_all_pairs_set(threshold):
    texts = _random_texts(300, seed=11)
    f = NoveltyFilter(texts[:20], threshold=threshold)
    pool = list(texts[:20])
    kept_fast, kept_ref = [], []
    for t in texts[20:]:
        best = max((_reference_f1(p, t) for p in pool), default=0.0)
        novel, score, _ = f.check(t)
        assert novel == (best <= threshold), (t, best, score)
        if not novel:
            assert score == best  # exact when rejecting
        exact_novel, exact, _ = f.is_novel(t)
        assert exact == best and exact_novel == novel
        if best <= threshold:
            kept_ref.append(t)
            pool.append(t)
        if novel:
            kept_fast.append(t)
            f.add(t)
    assert kept_fast == kept_ref
    assert len(f) == len(pool)


def test_candidate_index_skips_most_pairs():
    texts = _random_texts(1500, seed=3)
    f = NoveltyFilter(texts[:50], threshold=0.7)
    all_pairs = 0
    for t in texts[50:]:
        all_pairs += len(f)
        if f.check(t)[0]:
            f.add(t)
    # The bound prunes: exact LCS runs on a small share of what an all-pairs loop scores.
    assert f.pairs_scored < all_pairs / 5


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


def test_config_validation_names_field():
    SelfInstructConfig(num_instructions=0, max_attempts=0)
    SelfInstructConfig(max_attempts=2, generate_inputs=False)
    for kwargs, name in [
        ({"num_instructions": -1}, "num_instructions"),
        ({"batch_size": 0}, "batch_size"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"rouge_threshold": 1.5}, "rouge_threshold"),
        ({"max_attempts": 2}, "max_attempts"),  # a round with inputs needs 3 calls
        ({"min_instruction_words": 10, "max_instruction_words": 5}, "max_instruction_words"),
        ({"seed_tasks_per_prompt": 0}, "seed_tasks_per_prompt"),
        ({"synthetic_tasks_per_prompt": 9}, "synthetic_tasks_per_prompt"),
        ({"new_tasks_per_prompt": 0}, "new_tasks_per_prompt"),
    ]:
        with pytest.raises(ValueError, match=name):
            SelfInstructConfig(**kwargs)
    assert "num_instructions" in SelfInstructConfig.help()
    assert SelfInstructConfig().seed_tasks_per_prompt == 8


# ---------------------------------------------------------------- the loop


def test_loop_reaches_target_with_provenance():
    teacher = ScriptedTeacher(NOVEL, inputs={"Translate the sentence 'good morning' into Spanish.": "Input: good morning"})
    assert isinstance(teacher, Teacher)
    cfg = small_cfg()
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    assert len(acc) == 4 and stats["accepted"] == 4
    assert (acc["origin"] == "synthetic").all() and (acc["source"] == "self_instruct").all()
    for col in (*schema.ROW_COLUMNS, "teacher", "seed_ids", "generation_params", "rouge_l_max", "filter_scores",
                "instruction", "input", "instance_order"):
        assert col in acc.columns
    human_ids = set(seed_frame()["id"])
    for _, row in acc.iterrows():
        assert row["id"] == schema.conversation_id(row["messages"])
        assert row["messages"][-1]["role"] == "assistant"
        assert row["teacher"] == "scripted"
        assert isinstance(row["seed_ids"], list) and 1 <= len(row["seed_ids"]) <= cfg.seed_tasks_per_prompt
        params = json.loads(row["generation_params"])
        assert params["temperature"] == cfg.temperature and "instruction_seed" in params and params["round"] >= 0
        scores = json.loads(row["filter_scores"])
        assert scores["rouge_l_max"] == row["rouge_l_max"] and 0.0 <= row["rouge_l_max"] <= cfg.rouge_threshold
        assert row["instance_order"] == "input_first"
    assert set(acc.iloc[0]["seed_ids"]) <= human_ids  # nothing synthetic existed yet
    assert acc.iloc[0]["prompt"] == "Give three tips for staying healthy during winter."
    # Input-first: the teacher's input is appended to the user turn, and the answer was asked with it.
    translated = acc[acc["instruction"] == "Translate the sentence 'good morning' into Spanish."].iloc[0]
    assert translated["input"] == "good morning"
    assert translated["messages"][0]["content"] == "Translate the sentence 'good morning' into Spanish.\n\ngood morning"
    assert rej.empty and stats["rejected_by_reason"] == {}
    # Each round: instructions, inputs, outputs.
    assert [c["kinds"][0] for c in teacher.calls] == ["instruction", "input", "response"] * 2
    assert stats["attempts"] == len(teacher.calls) == 6
    # rouge_l_max is the exact best score against the pool at acceptance time.
    first = acc.iloc[0]
    pool = [s for s, _ in SEEDS] + ["Explain how rainbows form in the sky."]
    assert first["rouge_l_max"] == max(rouge_l_f1(first["instruction"], p) for p in pool)


def test_classification_tasks_are_generated_output_first():
    teacher = ScriptedTeacher(["Classify each animal as a mammal or a reptile: snake, cow, lizard.",
                               "Write a limerick about a forgetful robot."])
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, small_cfg(num_instructions=2))
    by_order = {r["instance_order"]: r for _, r in acc.iterrows()}
    cls = by_order["output_first"]
    assert cls["category"] == "classification"
    assert cls["response"] == "Positive"  # the label is the output
    assert cls["input"] == "I loved every minute of this film."
    assert pd.isna(by_order["input_first"]["category"])
    # The instance call mixed an output-first prompt with an input-first one; only the latter got an output call.
    assert sorted(teacher.calls[1]["kinds"]) == ["input", "output_first"]
    assert teacher.calls[2]["kinds"] == ["response"]


def test_generate_inputs_off_answers_in_the_instance_call():
    teacher = ScriptedTeacher(NOVEL)
    acc, _, stats = generate_synthetic_instructions(seed_frame(), teacher, small_cfg(generate_inputs=False, max_attempts=4))
    assert [c["kinds"][0] for c in teacher.calls] == ["instruction", "response"] * 2
    assert (acc["instance_order"] == "no_input").all() and (acc["input"] == "").all()


def test_loop_rejects_with_reasons_and_filter_counts():
    script = [
        "Write a short poem about the sea.",                            # exact copy of a seed
        "Write a short poem about the ocean.",                          # near copy of a seed
        "Draw a diagram of the solar system.",                          # blacklisted
        "Hi there",                                                     # too short
        "Explain how rainbows form in the sky!",                        # near copy of a non-seed pool row
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
    cfg = small_cfg(num_instructions=3, batch_size=4, max_attempts=9)
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
    assert reasons.count("exact_duplicate") == 2
    assert "non_answer" in reasons and "empty_response" in reasons
    assert (rej["stage"] == "augmentation").all() and (rej["source"] == "self_instruct").all()
    assert set(rej.columns) == set(schema.REJECT_COLUMNS)
    refused = rej[rej["reason"] == "non_answer"].iloc[0]
    assert refused["id"] and json.loads(refused["raw"])["instruction"] == script[8]
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"] == len(rej)
    assert stats["candidates"] == stats["accepted"] + stats["rejected"] == len(script)
    # Per-filter counts: every candidate meets 'parse'; each filter sees what the one before let through.
    filters = {f["filter"]: f for f in stats["filters"]}
    assert [f["filter"] for f in stats["filters"]] == [name for name, _ in FILTERS]
    assert filters["parse"]["checked"] == 12 and filters["parse"]["rejected"] == 1
    assert filters["length"]["checked"] == 11 and filters["length"]["rejected"] == 1
    assert filters["blacklist"]["rejected"] == 1 and filters["duplicate"]["rejected"] == 2
    assert filters["benchmark_overlap"]["rejected"] == 1 and filters["rouge_l_novelty"]["rejected"] == 2
    assert filters["response"]["checked"] == 4 and filters["response"]["rejected"] == 2
    assert filters["response"]["pass_rate"] == 0.5


def test_instance_benchmark_overlap_and_malformed_instance():
    question = ("Which of the following statements best describes the reason why the sky appears blue "
                "to an observer on the surface of the Earth during the day?")

    class Leaky(ScriptedTeacher):
        def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
            out = super().generate(prompts, max_new_tokens, temperature, top_p, seed)
            return ["no label here" if prompt_kind(p) == "output_first" else
                    ("It is " + question if prompt_kind(p) == "response" else o) for p, o in zip(prompts, out)]

    teacher = Leaky(["Explain a fact about the atmosphere to a child.", "Classify this tweet as happy or sad."])
    acc, rej, _ = generate_synthetic_instructions(seed_frame(), teacher, small_cfg(num_instructions=2, max_attempts=3),
                                                   benchmark_questions=[question])
    assert acc.empty
    assert sorted(rej["reason"]) == ["instance_benchmark_overlap", "malformed_instance"]


def test_loop_is_deterministic_and_seed_sensitive():
    cfg = small_cfg(num_instructions=3, seed=7)
    a1, r1, s1 = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg)
    a2, r2, s2 = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg)
    pd.testing.assert_frame_equal(a1, a2)
    pd.testing.assert_frame_equal(r1, r2)
    assert s1 == s2
    t1, t3 = ScriptedTeacher(NOVEL), ScriptedTeacher(NOVEL)
    generate_synthetic_instructions(seed_frame(), t1, cfg)
    generate_synthetic_instructions(seed_frame(), t3, small_cfg(num_instructions=3, seed=8))
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
    # Every candidate is a seed copy: only the budget stops the loop; rounds with no survivor cost one call.
    teacher = ScriptedTeacher([SEEDS[0][0]])
    cfg = small_cfg(num_instructions=5, max_attempts=4)
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    # A round starts only while 3 calls remain: rounds 1 and 2 run (one call each), then 2 left < 3 stops it.
    assert acc.empty and len(teacher.calls) == stats["attempts"] == 2
    assert stats["stopped"] == "budget_exhausted"
    assert set(rej["reason"]) == {"exact_duplicate"} and len(rej) == 4

    # With instances needed, a round costs three calls and never goes past the budget.
    teacher = ScriptedTeacher(NOVEL, answer="   ")
    cfg = small_cfg(num_instructions=50, max_attempts=8, batch_size=1)
    _, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg)
    assert len(teacher.calls) == stats["attempts"] == 6
    assert set(rej["reason"]) == {"empty_response"}


def test_no_human_seeds_is_an_error():
    only_synth = seed_frame()
    only_synth["origin"] = "synthetic"
    with pytest.raises(ValueError, match="human"):
        generate_synthetic_instructions(only_synth, ScriptedTeacher(NOVEL), SelfInstructConfig())


def test_examples_mix_human_seeds_with_few_synthetic_tasks():
    many_seeds = pd.DataFrame([
        schema.make_row([{"role": "user", "content": f"Seed task number {w} about {w} things."},
                         {"role": "assistant", "content": "ok"}], source="seed")
        for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    ])
    teacher = ScriptedTeacher(NOVEL)
    cfg = SelfInstructConfig(num_instructions=6, batch_size=2, new_tasks_per_prompt=1, max_attempts=40)
    acc, _, _ = generate_synthetic_instructions(many_seeds, teacher, cfg)
    first = teacher.calls[0]["prompts"][0][0]["content"]
    shown = [line.split(". ", 1)[1] for line in first.splitlines() if line[:1].isdigit()]
    assert len(shown) == 8 and set(shown) <= set(many_seeds["prompt"])
    synthetic_ids = set(acc["id"])
    mixed = [set(r["seed_ids"]) & synthetic_ids for _, r in acc.iterrows()]
    assert all(len(m) <= 2 for m in mixed)
    assert any(len(m) == 2 for m in mixed)  # once two synthetic tasks exist, prompts show two
    assert all(len(r["seed_ids"]) == 8 for _, r in acc.iterrows())


# ---------------------------------------------------------------- journal: resume and reuse


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg = small_cfg(num_instructions=6, max_attempts=40)
    full, full_rej, _ = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg)

    crashing = ScriptedTeacher(NOVEL, fail_on_call=5)  # dies in round 2, after round 1 was journaled
    with pytest.raises(RuntimeError, match="went away"):
        generate_synthetic_instructions(seed_frame(), crashing, cfg, cache_dir=tmp_path)
    journal = next(tmp_path.glob("*.jsonl"))
    lines = journal.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "header" and len(lines) == 2  # header + round 0
    persisted = json.loads(lines[1])["rows"]
    assert len(persisted) == 2

    resumed_teacher = ScriptedTeacher(NOVEL)
    resumed_teacher._next = 2  # a real teacher continues where sampling leaves it; the script must too
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), resumed_teacher, cfg, cache_dir=tmp_path)
    assert stats["reused_rounds"] == 1 and stats["new_rounds"] == 2
    assert not any(c["kinds"][0] == "instruction" and c["seed"] == crashing.calls[0]["seed"] for c in resumed_teacher.calls)
    pd.testing.assert_frame_equal(acc, full)
    pd.testing.assert_frame_equal(rej, full_rej)


def test_rerun_with_same_inputs_reuses_generations(tmp_path):
    cfg = small_cfg(num_instructions=4)
    first, _, s1 = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg, cache_dir=tmp_path)

    def no_teacher():
        raise AssertionError("nothing should be generated again")

    again, _, s2 = generate_synthetic_instructions(seed_frame(), None, cfg, cache_dir=tmp_path,
                                                   teacher_id="scripted", teacher_factory=no_teacher)
    pd.testing.assert_frame_equal(first, again)
    assert s2["new_calls"] == 0 and s2["reused_rounds"] == s1["rounds"] and s2["attempts"] == s1["attempts"]
    # A smaller target is served from the journal too.
    fewer, _, _ = generate_synthetic_instructions(seed_frame(), None, small_cfg(num_instructions=2), cache_dir=tmp_path,
                                                  teacher_id="scripted", teacher_factory=no_teacher)
    pd.testing.assert_frame_equal(fewer, first.iloc[:2])


def test_raising_the_target_extends_the_journal(tmp_path):
    generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), small_cfg(num_instructions=2), cache_dir=tmp_path)
    teacher = ScriptedTeacher(NOVEL)
    teacher._next = 2
    extended, _, stats = generate_synthetic_instructions(seed_frame(), teacher, small_cfg(num_instructions=5), cache_dir=tmp_path)
    fresh, _, _ = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), small_cfg(num_instructions=5))
    assert stats["reused_rounds"] == 1
    pd.testing.assert_frame_equal(extended, fresh)


def test_journal_key_follows_inputs_and_config(tmp_path):
    _, _, s = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), small_cfg(), cache_dir=tmp_path)
    keys = {s["generation_key"]}
    for frame, cfg, bench in [
        (seed_frame(extra_synthetic=False), small_cfg(), ()),
        (seed_frame(), small_cfg(temperature=0.5), ()),
        (seed_frame(), small_cfg(), ("A benchmark question?",)),
    ]:
        _, _, other = generate_synthetic_instructions(frame, ScriptedTeacher(NOVEL), cfg, benchmark_questions=bench, cache_dir=tmp_path)
        assert other["reused_rounds"] == 0
        keys.add(other["generation_key"])
    assert len(keys) == 4
    # The budget is not part of the key.
    _, _, same = generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), small_cfg(max_attempts=12), cache_dir=tmp_path)
    assert same["generation_key"] in keys and same["reused_rounds"] > 0


def test_torn_journal_line_is_dropped(tmp_path):
    cfg = small_cfg(num_instructions=4)
    generate_synthetic_instructions(seed_frame(), ScriptedTeacher(NOVEL), cfg, cache_dir=tmp_path)
    journal = next(tmp_path.glob("*.jsonl"))
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # crash in the middle of round 1
    teacher = ScriptedTeacher(NOVEL)
    teacher._next = 2
    acc, _, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg, cache_dir=tmp_path)
    assert stats["reused_rounds"] == 1 and stats["new_rounds"] == 1 and len(acc) == 4
    assert all(json.loads(line) for line in journal.read_text().splitlines())
    header = json.loads(journal.read_text().splitlines()[0])
    with pytest.raises(ValueError, match="another run"):
        GenerationJournal(journal, {**header, "key": "different"}).load()


# ---------------------------------------------------------------- mixing human and synthetic rows


def _rows(n: int, origin: str, tag: str) -> pd.DataFrame:
    return pd.DataFrame([
        schema.make_row([{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}], source=tag, origin=origin)
        for i in range(n)
    ])


def test_mix_human_and_synthetic_ratio():
    human, synthetic = _rows(30, "human", "h"), _rows(40, "synthetic", "s")
    mixed = mix_human_and_synthetic(human, synthetic, 0.25, seed=1)
    assert (mixed["origin"] == "human").sum() == 30 and (mixed["origin"] == "synthetic").sum() == 10
    assert mixed.attrs["mix"]["synthetic_ratio_achieved"] == 0.25
    picked = mixed[mixed["origin"] == "synthetic"]["id"].tolist()
    order = synthetic["id"].tolist()
    assert picked == sorted(picked, key=order.index)  # original order kept
    # Reproducible from the seed, different for another seed.
    assert mix_human_and_synthetic(human, synthetic, 0.25, seed=1)["id"].tolist() == mixed["id"].tolist()
    assert mix_human_and_synthetic(human, synthetic, 0.25, seed=2)["id"].tolist() != mixed["id"].tolist()
    assert (mix_human_and_synthetic(human, synthetic, 0.0, seed=1)["origin"] == "human").all()
    only = mix_human_and_synthetic(human, synthetic, 1.0, seed=1)
    assert len(only) == 40 and (only["origin"] == "synthetic").all()
    # Too few synthetic rows: all are used, no human row is dropped, the achieved share is reported.
    short = mix_human_and_synthetic(human, synthetic.iloc[:5], 0.5, seed=1)
    assert len(short) == 35 and short.attrs["mix"]["synthetic_ratio_achieved"] == pytest.approx(5 / 35)
    # A synthetic copy of a human row is dropped.
    dup = pd.concat([human.iloc[:1], synthetic.iloc[:3]], ignore_index=True)
    assert mix_human_and_synthetic(human, dup, 0.5, seed=0)["id"].is_unique
    empty = mix_human_and_synthetic(human, synthetic.iloc[:0], 0.5, seed=0)
    assert len(empty) == 30
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="synthetic_ratio"):
            mix_human_and_synthetic(human, synthetic, bad, seed=0)


# ---------------------------------------------------------------- the OpenAI-compatible HTTP teacher


class ChatServer:
    """A loopback OpenAI-compatible server: canned completions, scripted failures, request log."""

    def __init__(self, reply=None, fail_first: int = 0, fail_status: int = 503, delay_s: float = 0.0, slow_first: int = 0):
        self.reply = reply or (lambda body: f"echo: {body['messages'][-1]['content'][:40]}")
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay_s = delay_s
        self.slow_first = slow_first
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if n < server.slow_first:
                        time.sleep(1.0)  # longer than the client's timeout
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    if n < server.fail_first:
                        return self._send(server.fail_status, {"error": {"message": "overloaded"}})
                    content = server.reply(body)
                    self._send(200, {"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}]})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_http_teacher_retries_a_503_and_sends_the_key():
    with ChatServer(fail_first=1) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "teacher-model", api_key="sk-test", backoff_s=0.01, retries=2)
        out = teacher.generate([chat_prompt("hello")], max_new_tokens=7, temperature=0.5, top_p=0.9, seed=11)
    assert out == ["echo: hello"]
    assert len(server.requests) == 2 and teacher.retries_used == 1
    body = server.requests[-1]
    assert body["model"] == "teacher-model" and body["max_tokens"] == 7 and body["seed"] == 11
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["messages"] == chat_prompt("hello")
    assert server.headers[-1]["Authorization"] == "Bearer sk-test"
    assert "sk-test" not in repr(teacher)


def test_http_teacher_keeps_order_and_limits_concurrency():
    with ChatServer(delay_s=0.05) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", concurrency=2, backoff_s=0.01)
        prompts = [chat_prompt(f"prompt {i}") for i in range(8)]
        out = teacher.generate(prompts, max_new_tokens=5, temperature=0.0, top_p=1.0, seed=100)
    assert out == [f"echo: prompt {i}" for i in range(8)]
    assert server.max_in_flight == 2  # parallel, but never more than the limit
    assert sorted(r["seed"] for r in server.requests) == list(range(100, 108))  # one seed per prompt


def test_http_teacher_gives_up_and_does_not_retry_client_errors():
    with ChatServer(fail_first=10) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", retries=2, backoff_s=0.01)
        with pytest.raises(TeacherError, match="after 3 attempts.*503.*overloaded"):
            teacher.generate([chat_prompt("x")], 5, 0.0, 1.0, 0)
    assert len(server.requests) == 3
    with ChatServer(fail_first=10, fail_status=400) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", retries=3, backoff_s=0.01)
        with pytest.raises(TeacherError, match="HTTP 400: overloaded"):
            teacher.generate([chat_prompt("x")], 5, 0.0, 1.0, 0)
    assert len(server.requests) == 1


def test_http_teacher_retries_after_a_timeout():
    with ChatServer(slow_first=1) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", timeout_s=0.3, retries=1, backoff_s=0.01)
        assert teacher.generate([chat_prompt("late")], 5, 0.0, 1.0, 0) == ["echo: late"]
    assert len(server.requests) == 2


def test_build_teacher_reads_the_key_from_the_named_env_var():
    cfg = TeacherConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="SFT_TEST_TEACHER_KEY")
    with pytest.raises(ValueError, match="SFT_TEST_TEACHER_KEY"):
        build_teacher(cfg, environ={})
    teacher = build_teacher(cfg, environ={"SFT_TEST_TEACHER_KEY": "secret"})
    assert isinstance(teacher, OpenAICompatibleTeacher) and teacher.name == "m"
    assert teacher.fingerprint == teacher_identity(cfg) == "openai:m@http://127.0.0.1:9/v1"
    for kwargs, name in [({"backend": "tgi"}, "backend"), ({"backend": "openai", "model": "m"}, "base_url"),
                         ({"backend": "hf"}, "model"), ({"concurrency": 0}, "concurrency"), ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=name):
            TeacherConfig(**kwargs)


def self_instruct_server_reply(body: dict) -> str:
    """A stand-in for a strong teacher: new tasks, inputs, labels and answers, deterministic in the seed."""
    text = body["messages"][-1]["content"]
    kind = prompt_kind(body["messages"])
    tasks = [
        "Explain how volcanoes form and why some erupt explosively.",
        "Write a polite email asking a landlord to fix a leaking tap.",
        "Classify this sentence as formal or informal.",
        "Give a step-by-step recipe for sourdough bread.",
        "Compare two popular chess openings for beginners.",
        "Summarize the main causes of the French Revolution.",
        "Categorize these fruits by colour: banana, cherry, lime.",
        "Suggest five names for a podcast about personal finance.",
        "Describe how compound interest grows savings over decades.",
        "Is this statement fact or opinion: jazz began in New Orleans.",
        "Translate a short greeting into Japanese and explain its politeness level.",
        "Draft a haiku about bird migration in autumn.",
    ]
    if kind == "instruction":
        a, b = random.Random(body["seed"]).sample(tasks, 2)
        return f"9. {a}\n10. {b}"
    if kind == "input":
        return "<noinput>"
    if kind == "output_first":
        return "Class label: formal\nInput: We kindly request your attendance."
    return f"Here is a careful answer to: {text[:60]}"


def test_loop_runs_against_the_http_teacher(tmp_path):
    with ChatServer(reply=self_instruct_server_reply, fail_first=1) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "strong-teacher", concurrency=3, backoff_s=0.01)
        cfg = small_cfg(num_instructions=4, new_tasks_per_prompt=2)
        acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg, cache_dir=tmp_path)
        sent = len(server.requests)
        again, _, s2 = generate_synthetic_instructions(seed_frame(), teacher, cfg, cache_dir=tmp_path)
        assert len(server.requests) == sent and s2["new_calls"] == 0  # reused, not re-requested
    assert len(acc) == 4 and (acc["teacher"] == "strong-teacher").all()
    assert set(acc["instance_order"]) == {"input_first", "output_first"}
    assert (acc[acc["instance_order"] == "output_first"]["response"] == "formal").all()
    pd.testing.assert_frame_equal(acc, again)
    assert stats["journal"].startswith(str(tmp_path))


# ---------------------------------------------------------------- the asset, called directly


def _prepare_storage(tmp_path):
    from sft_pipeline.resources import PipelineStorage

    storage = PipelineStorage(root=str(tmp_path / "artifacts"))
    schema.write_rows(seed_frame(), storage.asset_dir("clean_instructions") / "rows.parquet")
    pd.DataFrame({"question": ["What is the boiling point of water at sea level?"], "subject": ["chemistry"]}).to_parquet(
        storage.asset_dir("mmlu_benchmark") / "questions.parquet")
    return storage


def test_asset_with_http_backend_reports_metadata_and_reuses(tmp_path, monkeypatch):
    from sft_pipeline.assets.augmentation import SyntheticInstructionsConfig, synthetic_instructions

    storage = _prepare_storage(tmp_path)
    monkeypatch.setenv("SFT_TEST_ASSET_KEY", "sk-asset")
    with ChatServer(reply=self_instruct_server_reply) as server:
        config = SyntheticInstructionsConfig(
            num_instructions=3, batch_size=2, seed_tasks_per_prompt=4,
            teacher={"backend": "openai", "base_url": server.base_url, "model": "strong", "api_key_env": "SFT_TEST_ASSET_KEY",
                     "backoff_s": 0.01},
        )
        result = synthetic_instructions(dg.build_asset_context(), config, storage)
        sent = len(server.requests)
        assert all(h["Authorization"] == "Bearer sk-asset" for h in server.headers)
        monkeypatch.delenv("SFT_TEST_ASSET_KEY")  # a replay needs no key: the teacher is never built
        again = synthetic_instructions(dg.build_asset_context(), config, storage)
        assert len(server.requests) == sent
    md = result.metadata
    rows = schema.read_rows(md["path"].path)
    assert len(rows) == md["dagster/row_count"] == 3
    assert result.data_version is not None and result.data_version == again.data_version
    assert md["teacher"] == "strong" and md["teacher_backend"] == "openai"
    assert again.metadata["new_teacher_calls"] == 0 and again.metadata["reused_rounds"] >= 1
    assert "rouge_l_novelty" in md["acceptance_per_filter"].value
    assert "sk-asset" not in json.dumps({k: str(v) for k, v in md.items()})
    assert storage.read_manifest("synthetic_instructions")["rows"] == 3


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
    assert build_teacher(TeacherConfig(backend="hf", model=str(tiny_model_dir))).fingerprint == teacher.fingerprint


def test_loop_runs_end_to_end_on_tiny_model(tiny_model_dir, tmp_path):
    # The random model writes gibberish: the point is that the loop runs and accounts for every candidate.
    teacher = LocalHFTeacher(tiny_model_dir, name="tiny")
    cfg = SelfInstructConfig(num_instructions=2, max_attempts=6, batch_size=2, max_new_tokens_instruction=12,
                             max_new_tokens_instance=8, max_new_tokens_response=12, min_instruction_words=1)
    acc, rej, stats = generate_synthetic_instructions(seed_frame(), teacher, cfg, cache_dir=tmp_path)
    assert stats["attempts"] <= 6
    assert stats["candidates"] == stats["accepted"] + stats["surplus"] + stats["rejected"]
    assert len(acc) == stats["accepted"] and len(rej) == stats["rejected"]
    if len(acc):
        assert (acc["teacher"] == "tiny").all()
    again, _, s2 = generate_synthetic_instructions(seed_frame(), teacher, cfg, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(acc, again)
    assert s2["new_calls"] == 0
