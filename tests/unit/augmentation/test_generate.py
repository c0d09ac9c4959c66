"""The Self-Instruct loop with a scripted teacher, the HTTP teacher and a tiny local model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_pipeline import schema
from sft_pipeline.augmentation.config import SelfInstructConfig
from sft_pipeline.augmentation.filters import FILTERS
from sft_pipeline.augmentation.generate import generate_synthetic_instructions
from sft_pipeline.augmentation.teachers import LocalHFTeacher, OpenAICompatibleTeacher, Teacher
from sft_pipeline.text_metrics import rouge_l_f1
from tests.unit.augmentation.helpers import (
    NOVEL,
    SEEDS,
    ChatServer,
    ScriptedTeacher,
    prompt_kind,
    seed_frame,
    self_instruct_server_reply,
    small_cfg,
)


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
