"""Candidate filters: keyword blacklist, benchmark overlap, response checks."""

from __future__ import annotations

from sft_pipeline.augmentation.filters import BenchmarkOverlap, blacklisted_keyword, response_problem


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


def test_response_problem_codes():
    assert response_problem("Do x", "", 2)[0] == "empty_response"
    assert response_problem("Do x", "a", 2)[0] == "empty_response"
    assert response_problem("Name a colour.", "name a  colour.", 2)[0] == "non_answer"
    assert response_problem("Name a colour.", "I'm sorry, I cannot help.", 2)[0] == "non_answer"
    assert response_problem("Name a colour.", "As an AI, I have no eyes.", 2)[0] == "non_answer"
    assert response_problem("Name a colour.", "Blue.", 2) is None
