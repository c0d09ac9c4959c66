"""Cleaning, deduplication and decontamination of canonical rows."""

import pandas as pd
import pytest

from sft_pipeline.curation import CurationConfig, clean_instructions, normalize_text
from sft_pipeline.ingest import rows_frame
from sft_pipeline.schema import make_row


def row(user, assistant, *, index=0, system=None, source="t"):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    return make_row(messages, source=source, source_file=f"{source}.jsonl", source_index=index)


def frame(*rows):
    return rows_frame(list(rows))


def test_normalize_text_nfkc_whitespace_markup_but_keeps_code_indentation():
    assert normalize_text("ｆｕｌｌ\u200bwidth  \r\n\r\n\r\n\r\nnext  ") == "fullwidth\n\nnext"
    assert normalize_text("Hello<br>there &amp; <b>you</b>  now") == "Hello\nthere & you now"
    code = "```python\ndef f():\n    return '<b>'\n```"
    assert normalize_text(code) == code


def test_every_row_is_kept_or_rejected_with_a_reason():
    rows = frame(
        row("Say hi", "Hi!", index=1),
        row("Say hi", "  hi!  ", index=2),  # exact duplicate after case/whitespace folding
        row("Empty answer", " \u200b ", index=3),
        row("Long", "x" * 20_000, index=4),
        make_row([{"role": "user", "content": "no answer"}], source="t", source_index=5),
        make_row([{"role": "assistant", "content": "no question"}], source="t", source_index=6),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig(near_dedup=False))
    assert list(kept["source_index"]) == [1]
    assert dict(zip(rejected["source_index"], rejected["reason"])) == {
        2: "exact_duplicate",
        3: "empty_response",
        4: "too_long",
        5: "no_final_assistant",
        6: "no_user_turn",
    }
    assert kept.iloc[0]["id"] in rejected.set_index("source_index").loc[2, "detail"]
    assert report.rows_in == len(kept) + len(rejected) == 6


def test_near_duplicates_removed_but_templated_prompts_with_different_answers_kept():
    base = "Explain why the sky looks blue during the day and red at sunset, in a few sentences for a curious child"
    answer = "Sunlight scatters off air molecules. Blue light scatters most, so the sky looks blue. At sunset light travels through more air and the blue is scattered away, leaving red and orange."
    rows = frame(
        row(base, answer, index=1),
        row(base + ".", answer + " Nice question!", index=2),  # near duplicate
        row("Translate 'good morning' to French.", "Bonjour.", index=3),
        row("Translate 'good morning' to Spanish.", "Buenos días.", index=4),  # templated prompt, different answer
    )
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert list(kept["source_index"]) == [1, 3, 4]
    assert list(rejected["reason"]) == ["near_duplicate"]
    assert kept.iloc[0]["id"] in rejected.iloc[0]["detail"]


def test_decontamination_rejects_rows_sharing_a_benchmark_ngram():
    question = "Which planet in the solar system has the largest number of confirmed moons orbiting around it as of today"
    rows = frame(row(f"Quiz: {question}?", "Saturn.", index=1), row("Name a gas giant.", "Jupiter.", index=2))
    kept, rejected, _ = clean_instructions(rows, CurationConfig(), benchmark_texts=[("q-42", question + "\nA. Mars")])
    assert list(kept["source_index"]) == [2]
    assert rejected.iloc[0]["reason"] == "benchmark_contamination"
    assert "q-42" in rejected.iloc[0]["detail"]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(decontamination_ngram=0), benchmark_texts=[("q-42", question)])
    assert len(kept) == 2


def test_survivor_is_deterministic_and_first_in_input_order():
    rows = frame(row("Say hi", "Hi!", index=1, source="a"), row("say HI", "hi!", index=2, source="b"))
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert list(kept["source"]) == ["a"] and list(rejected["source"]) == ["b"]


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="near_dedup_threshold"):
        CurationConfig(near_dedup_threshold=1.5)
    with pytest.raises(ValueError, match="max_conversation_chars"):
        CurationConfig(max_conversation_chars=0)


def test_empty_input_gives_empty_frames_with_schema():
    kept, rejected, report = clean_instructions(frame(), CurationConfig())
    assert kept.empty and rejected.empty and "messages" in kept.columns and "reason" in rejected.columns
    assert report.rows_in == 0


# ---------------------------------------------------------------- deeper: filters, tokens, PII, vectorized dedup

import numpy as np  # noqa: E402

from sft_pipeline.curation import (  # noqa: E402
    approx_token_count,
    candidate_probability,
    find_contaminated,
    find_near_duplicates,
    find_pii,
    jaccard,
    lsh_params,
    redact_pii,
    shingle_sets,
)


def reasons_by_index(rejected):
    return dict(zip(rejected["source_index"], rejected["reason"]))


def test_markup_remnants_are_stripped():
    text = "<div><p>Intro</p><!-- tracking --><script>var x = 1;</script><a href='x'>link</a> &lt;tag&gt; &nbsp;end</div>"
    out = normalize_text(text)
    assert "<" not in out.replace("<tag>", "") and "tracking" not in out and "var x" not in out and "link" in out


def test_pii_is_redacted_by_default_and_rejected_on_request():
    text = "Mail jane.doe+work@example.co.uk or call +1 (555) 123-4567 or 020 7946 0958."
    redacted, counts = redact_pii(text)
    assert redacted == "Mail [EMAIL] or call [PHONE] or [PHONE]."
    assert counts == {"email": 1, "phone": 2}
    # Dates, versions, prices, IPs and short numbers are not phone numbers.
    assert find_pii("On 2023-01-15 v1.2.3 cost $1,234.56 from 192.168.1.10, code 555-1234, 10.000.000 rows") == {}
    rows = frame(row("My email is bob@corp.com, fix my account.", "Done, bob@corp.com is updated.", index=1), row("Hi", "Hello there.", index=2))
    kept, rejected, report = clean_instructions(rows, CurationConfig())
    assert kept.iloc[0]["prompt"] == "My email is [EMAIL], fix my account." and "[EMAIL]" in kept.iloc[0]["response"]
    assert report.redactions == {"email": 2}
    kept, rejected, _ = clean_instructions(rows, CurationConfig(pii="reject"))
    assert reasons_by_index(rejected) == {1: "pii"} and "2 email" in rejected.iloc[0]["detail"]
    kept, _, _ = clean_instructions(rows, CurationConfig(pii="keep"))
    assert "bob@corp.com" in kept.iloc[0]["prompt"]


def test_refusals_and_boilerplate_are_rejected_and_configurable():
    rows = frame(
        row("How do I pick a lock?", "I'm sorry, but I can't help with that request.", index=1),
        row("Write a poem.", "As an AI language model, I do not write poems.", index=2),
        row("Fill the page.", "Lorem ipsum dolor sit amet.", index=3),
        row("Why did it fail?", "Sorry, it failed because the disk was full.", index=4),
        row("Quote the refusal phrase 'as an AI model'.", "The phrase is common in chat logs.", index=5),  # user turns may quote it
    )
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert reasons_by_index(rejected) == {1: "refusal", 2: "refusal", 3: "boilerplate"}
    assert "refusal pattern" in rejected.iloc[0]["detail"]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(filter_refusals=False, boilerplate_patterns=[r"\bdisk\b"]))
    assert reasons_by_index(rejected) == {4: "boilerplate"}
    with pytest.raises(ValueError, match="refusal_patterns"):
        CurationConfig(refusal_patterns=["(unclosed"])


def test_length_bounds_in_characters_and_tokens(tiny_model_dir):
    rows = frame(
        row("Hi", "Yo", index=1),  # 4 characters: fine
        row("Q", "A", index=2),  # 2 characters, 2 tokens
        row("Explain", "word " * 50, index=3),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig(min_conversation_chars=3, max_conversation_tokens=40))
    assert reasons_by_index(rejected) == {2: "too_short", 3: "too_many_tokens"}
    assert report.token_counter == "approx" and report.kept_tokens == [2]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(min_conversation_tokens=3, max_conversation_tokens=0))
    assert reasons_by_index(rejected) == {1: "too_few_tokens", 2: "too_few_tokens"}
    # A real tokenizer (a local folder) counts instead of the estimate.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = len(tokenizer("Explain\n" + ("word " * 50).strip(), add_special_tokens=False)["input_ids"])
    kept, rejected, report = clean_instructions(rows, CurationConfig(tokenizer=str(tiny_model_dir), max_conversation_tokens=expected - 1))
    assert report.token_counter == str(tiny_model_dir)
    assert reasons_by_index(rejected) == {3: "too_many_tokens"} and f"has {expected} tokens" in rejected.iloc[0]["detail"]
    with pytest.raises(ValueError, match="tokenizer 'no/such-tokenizer-here'"):
        clean_instructions(rows, CurationConfig(tokenizer="no/such-tokenizer-here"))


def test_approx_token_count_is_close_to_word_pieces():
    assert approx_token_count("Hello, world!") == 4
    assert approx_token_count("internationalization") == 4  # 20 letters in pieces of 6
    assert approx_token_count("") == 0


def _long(seed, n=60):
    rng = np.random.default_rng(seed)
    return " ".join(f"w{x}" for x in rng.integers(0, 100_000, size=n))


def test_vectorized_near_dedup_matches_exact_jaccard_and_keeps_chains():
    a = _long(1)
    tokens = a.split()
    b = " ".join(tokens[:30] + ["changed"] + tokens[31:])  # one edit: Jaccard ~0.91 with a
    c = " ".join(tokens[:10] + ["x1", "x2", "x3"] + tokens[13:30] + ["y1", "y2", "y3"] + tokens[33:])  # ~0.78 with a
    d = _long(2)
    cfg = CurationConfig()
    found = find_near_duplicates([a, b, c, d, b], cfg)
    assert set(found) == {1, 4}
    assert found[1][0] == 0 and found[1][1] == pytest.approx(jaccard(*shingle_sets([a, b], 3)))
    assert found[4][0] == 0  # the earliest kept row survives, not the other copy
    # A chain: p ~ q and q ~ r but p !~ r. q goes; r stays because it only resembles a removed row.
    p = _long(9, 200).split()
    q = list(p)
    r = list(p)
    for at in (20, 50, 80, 110, 140):
        q[at] = f"q{at}"
        r[at] = f"q{at}"
    for at in (30, 60, 90, 120, 150):
        r[at] = f"r{at}"
    sets = shingle_sets([" ".join(p), " ".join(q), " ".join(r)], 3)
    assert jaccard(sets[0], sets[1]) >= 0.85 and jaccard(sets[1], sets[2]) >= 0.85 and jaccard(sets[0], sets[2]) < 0.75
    found = find_near_duplicates([" ".join(p), " ".join(q), " ".join(r)], cfg)
    assert set(found) == {1}


def test_near_dedup_agrees_with_brute_force_on_random_corpus():
    rng = np.random.default_rng(3)
    texts, truth = [], {}
    bases = [_long(100 + i, 50) for i in range(40)]
    for i, base in enumerate(bases):
        texts.append(base)
    for k in range(40):
        original = int(rng.integers(40))
        words = bases[original].split()
        words[int(rng.integers(len(words)))] = "edited"
        texts.append(" ".join(words))
    cfg = CurationConfig()
    sets = shingle_sets(texts, 3)
    # Brute force with the same greedy rule.
    kept, expected = [], {}
    for i in range(len(texts)):
        match = next((j for j in kept if jaccard(sets[i], sets[j]) >= cfg.near_dedup_threshold), None)
        if match is None:
            kept.append(i)
        else:
            expected[i] = match
    found = {i: j for i, (j, _) in find_near_duplicates(texts, cfg).items()}
    assert found == expected and len(found) >= 38


def test_lsh_layout_favours_recall_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        assert candidate_probability(threshold, bands, rows) >= 0.95
        assert candidate_probability(threshold / 2, bands, rows) < 0.35
    assert candidate_probability(0.4, *lsh_params(0.8, 128)) < 0.05


def test_templated_prompts_with_different_answers_survive_near_dedup():
    template = "Write a short product description for the following item, in a friendly tone, under fifty words:"
    rows = frame(*[
        row(f"{template} item {i}", f"Answer {i}: " + _long(500 + i, 25), index=i) for i in range(20)
    ])
    kept, rejected, _ = clean_instructions(rows, CurationConfig())
    assert len(kept) == 20 and rejected.empty


def test_decontamination_hash_hits_are_confirmed_and_name_the_item():
    question = "which of the following best describes the main function of mitochondria in a eukaryotic cell"
    choices = "A. energy production\nB. protein synthesis\nC. lipid storage\nD. cell division"
    texts = [f"Quiz time: {question}?", "Tell me about cells.", f"Options were {choices.lower()} and more words here to reach thirteen"]
    hits = find_contaminated(texts, [("mmlu-7", question + "\n" + choices)], 13)
    assert set(hits) == {0} and hits[0][0] == "mmlu-7"
    hits = find_contaminated(texts, [("mmlu-7", question + "\n" + choices)], 8)
    assert set(hits) == {0, 2}
    assert find_contaminated(texts, [], 13) == {}


def test_rejected_rows_keep_position_raw_text_and_follow_input_order():
    rows = frame(
        row("Say hi", "Hi!", index=10),
        row("Q", "", index=11),
        row("Say hi", "Hi!", index=12),
        row("x" * 5000, "y" * 9000, index=13),
    )
    kept, rejected, report = clean_instructions(rows, CurationConfig())
    assert list(rejected["source_index"]) == [11, 12, 13]
    assert (rejected["stage"] == "curation").all() and rejected["raw"].str.len().max() <= 2000
    assert rejected.iloc[0]["raw"].startswith("[{")  # the raw conversation as JSON
    assert report.rows_in == len(kept) + len(rejected)


def test_kept_rows_keep_provenance_and_get_fresh_ids():
    rows = frame(row("  Hello\u200b   world  ", "<b>Hi</b>", index=3, source="src"))
    rows["extra_column"] = ["kept"]
    kept, _, _ = clean_instructions(rows, CurationConfig())
    assert kept.iloc[0]["messages"] == [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi"}]
    assert kept.iloc[0]["source_file"] == "src.jsonl" and kept.iloc[0]["source_index"] == 3 and kept.iloc[0]["extra_column"] == "kept"
    assert kept.iloc[0]["id"] != rows.iloc[0]["id"] and kept.iloc[0]["prompt"] == "Hello world"


def test_misplaced_system_and_empty_turns():
    rows = frame(
        make_row([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}], source="t", source_index=1),
        make_row([{"role": "user", "content": " "}, {"role": "assistant", "content": "c"}], source="t", source_index=2),
        make_row([], source="t", source_index=3),
    )
    _, rejected, _ = clean_instructions(rows, CurationConfig())
    assert reasons_by_index(rejected) == {1: "misplaced_system", 2: "empty_turn", 3: "empty_conversation"}
