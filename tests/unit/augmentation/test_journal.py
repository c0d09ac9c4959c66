"""The journal: resume after a crash, reuse on rerun, extension, the key, torn lines."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_pipeline.augmentation.generate import generate_synthetic_instructions
from sft_pipeline.augmentation.journal import GenerationJournal
from tests.unit.augmentation.helpers import NOVEL, ScriptedTeacher, seed_frame, small_cfg


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
