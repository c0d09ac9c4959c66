"""Self-Instruct augmentation: a teacher LLM grows the human seed set with filtered synthetic rows.

Plain domain logic (no Dagster). The loop follows Self-Instruct (Wang et al. 2022) as used for
Stanford Alpaca:

1. each instruction prompt shows k tasks sampled from the pool (mostly human seeds, a few earlier
   synthetic ones) and asks the teacher for new tasks;
2. every new instruction goes through the filters (parse, length, keyword blacklist, duplicates,
   benchmark overlap, ROUGE-L novelty against the whole pool through a candidate index);
3. the teacher writes an instance for each survivor: classification tasks output-first (a class
   label, then an input of that class), the others input-first (an input when the task needs one,
   then the output);
4. the instance goes through the response filters (empty / non-answer, benchmark overlap).

Each discarded candidate becomes a reject row with a reason. Every round is appended to a journal
keyed by (seed data, teacher, config), so an interrupted run resumes without regenerating what it
already has, and rematerializing with unchanged inputs reuses earlier generations.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from sft_pipeline import schema
from sft_pipeline.teachers import LocalHFTeacher, Teacher, short_hash, teacher_fingerprint

SOURCE = "self_instruct"
STAGE = "augmentation"
# Bumped whenever the prompt wording or the loop changes, so provenance tells which prompt made a row
# and cached generations from an older loop are not reused.
PROMPT_VERSION = "self_instruct_v2"
JOURNAL_VERSION = 1

# Tasks a text-only model cannot do (Alpaca's list).
BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)
_BLACKLIST_RE = re.compile(
    r"\b(?:" + "|".join(r"\s+".join(map(re.escape, kw.split())) for kw in BLACKLIST) + r")\b",
    re.IGNORECASE,
)
REFUSAL_PREFIXES = (
    "i'm sorry", "i am sorry", "sorry,", "i apologize", "as an ai", "as a language model",
    "i cannot", "i can't", "i can not", "i'm unable", "i am unable", "i'm not able", "i am not able",
)
BENCHMARK_NGRAM = 13

# The filters in the order a candidate meets them, and the reason codes each one writes.
FILTERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parse", ("empty_instruction",)),
    ("length", ("too_short", "too_long")),
    ("blacklist", ("blacklisted_keyword",)),
    ("duplicate", ("exact_duplicate",)),
    ("benchmark_overlap", ("benchmark_overlap",)),
    ("rouge_l_novelty", ("too_similar",)),
    ("instance_format", ("malformed_instance",)),
    ("response", ("empty_response", "non_answer")),
    ("instance_benchmark_overlap", ("instance_benchmark_overlap",)),
)
REASONS = tuple(r for _, reasons in FILTERS for r in reasons)
_FILTER_OF = {r: name for name, reasons in FILTERS for r in reasons}
# Config fields that bound a run but do not change what any round generates: a journal made with
# other values is reused (and extended, or cut short) instead of starting over.
BUDGET_FIELDS = ("num_instructions", "max_attempts")


@dataclass
class SelfInstructConfig:
    """Settings of one Self-Instruct run; defaults fit the CPU demo."""

    num_instructions: int = field(default=4, metadata={"help": "Target number of accepted synthetic rows; 0 skips generation."})
    max_attempts: int = field(default=8, metadata={"help": "Budget of teacher calls (each batched call counts once: instructions, instances and outputs). A round starts only while it can finish within the budget."})
    seed_tasks_per_prompt: int = field(default=8, metadata={"help": "k: example tasks shown in each instruction prompt (Self-Instruct: 8)."})
    synthetic_tasks_per_prompt: int = field(default=2, metadata={"help": "How many of the k examples are earlier synthetic tasks once some exist (Self-Instruct: 2 of 8); the rest are human seeds."})
    new_tasks_per_prompt: int = field(default=2, metadata={"help": "New instructions asked for in each instruction prompt."})
    generate_inputs: bool = field(default=True, metadata={"help": "Input-first instances: the teacher writes an input for tasks that need one before answering (one extra call per round). Off: non-classification tasks are answered from the instruction alone."})
    max_new_tokens_instruction: int = field(default=64, metadata={"help": "Token limit when the teacher writes new instructions (for all new_tasks_per_prompt of them)."})
    max_new_tokens_instance: int = field(default=48, metadata={"help": "Token limit when the teacher writes an input, or a class label and input."})
    max_new_tokens_response: int = field(default=128, metadata={"help": "Token limit when the teacher answers an instruction."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    rouge_threshold: float = field(default=0.7, metadata={"help": "Reject a candidate whose ROUGE-L F1 to any pool or benchmark text is above this."})
    min_instruction_words: int = field(default=3, metadata={"help": "Reject instructions with fewer words."})
    max_instruction_words: int = field(default=150, metadata={"help": "Reject instructions with more words."})
    min_response_chars: int = field(default=2, metadata={"help": "Reject responses shorter than this (after stripping)."})
    seed: int = field(default=0, metadata={"help": "Seed for example sampling and teacher sampling; same seed, same output."})
    batch_size: int = field(default=4, metadata={"help": "Instruction prompts per teacher call (one round)."})

    def __post_init__(self) -> None:
        minimums = {
            "num_instructions": 0, "max_attempts": 0, "seed_tasks_per_prompt": 1, "synthetic_tasks_per_prompt": 0,
            "new_tasks_per_prompt": 1, "max_new_tokens_instruction": 1, "max_new_tokens_instance": 1,
            "max_new_tokens_response": 1, "min_instruction_words": 0, "max_instruction_words": 1,
            "min_response_chars": 0, "batch_size": 1,
        }
        for name, lowest in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {value}")
        if self.synthetic_tasks_per_prompt > self.seed_tasks_per_prompt:
            raise ValueError(
                f"synthetic_tasks_per_prompt ({self.synthetic_tasks_per_prompt}) must be <= "
                f"seed_tasks_per_prompt ({self.seed_tasks_per_prompt})"
            )
        if self.num_instructions > 0 and self.max_attempts < self.calls_per_round:
            raise ValueError(
                f"max_attempts must be >= {self.calls_per_round} when num_instructions > 0 "
                f"(one round makes up to {self.calls_per_round} teacher calls), got {self.max_attempts}"
            )
        if self.max_instruction_words < self.min_instruction_words:
            raise ValueError(
                f"max_instruction_words ({self.max_instruction_words}) must be >= "
                f"min_instruction_words ({self.min_instruction_words})"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.rouge_threshold <= 1:
            raise ValueError(f"rouge_threshold must be in [0, 1], got {self.rouge_threshold}")

    @property
    def calls_per_round(self) -> int:
        """Most teacher calls one round makes: instructions, instances, and (input-first) outputs."""
        return 3 if self.generate_inputs else 2

    def generation_fields(self) -> dict[str, Any]:
        """The settings that change what a round generates (everything but the budget)."""
        return {k: v for k, v in asdict(self).items() if k not in BUDGET_FIELDS}

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for Dagster config descriptions and docs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# --------------------------------------------------------------------------------------------
# Prompts and parsing
# --------------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def build_instruction_prompt(example_tasks: list[str], num_new: int = 1) -> list[dict[str, str]]:
    """A user message listing the k example tasks and asking for `num_new` new, different tasks."""
    examples = "\n".join(f"{i}. {_one_line(t)}" for i, t in enumerate(example_tasks, 1))
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


_PREFIX_RE = re.compile(
    r"""^(?:
        \s*\#\d+\s*[.):]?\s*                                                 # #1  #1.
      | \s*(?:[-*\u2022>#]+\s*)                                            # bullets, quote marks, headings
      | \s*\(?\d+\s*(?:[.):\]](?!\d)|-\s)\s*                              # 1.  1)  (1)  1:  1 - (not 1.5, 3-step)
      | \s*\*{0,2}(?:new\s+)?(?:task|instruction|question|prompt)(?:\s*\#?\d+)?\s*\*{0,2}\s*[:.\-]\s*\*{0,2}  # Task: / New task 5:
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019*"


_PREAMBLE_RE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|great|absolutely)[!,.]+\s*"
    r"|^here(?:'s| is| are)\b[^:]*?(?:task|instruction|example|one)s?\s*[:.!-]\s*",
    re.IGNORECASE,
)


def _strip_decorations(line: str) -> str:
    # Strip repeatedly: replies like '1. Task: "..."' stack several decorations.
    while True:
        stripped = _PREFIX_RE.sub("", line, count=1)
        stripped = _PREAMBLE_RE.sub("", stripped, count=1).strip().strip(_QUOTES).strip()
        if stripped == line:
            return line
        line = stripped


def parse_instructions(text: str, limit: int | None = None) -> list[str]:
    """The instruction lines of a teacher reply, in order, without numbering, bullets, quotes or lead-ins.

    A line ending in ':' that is followed by more lines is a lead-in ("Here are two new tasks:") and
    is skipped; repeated lines count once. At most `limit` instructions are returned.
    """
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if line.endswith(":") and i + 1 < len(lines):
            continue
        cleaned = _strip_decorations(line)
        key = _normalize(cleaned)
        if cleaned and key not in seen:
            seen.add(key)
            out.append(cleaned)
            if limit is not None and len(out) >= limit:
                break
    return out


def parse_instruction(text: str) -> str:
    """The first instruction line of a teacher reply (see `parse_instructions`), or ''."""
    found = parse_instructions(text, limit=1)
    return found[0] if found else ""


_NOINPUT_RE = re.compile(
    r"^\W*(?:<\s*no\s*input\s*>|no\s*input(?:\s+(?:is\s+)?(?:needed|required))?|none|n/?a|not applicable|nothing)\W*$",
    re.IGNORECASE,
)
_INPUT_LABEL_RE = re.compile(r"^\s*\**\s*(?:example\s+)?input\s*\**\s*:\s*\**\s*", re.IGNORECASE)


def parse_input(text: str) -> str:
    """The input from an input-first reply; '' when the teacher says the task needs none."""
    text = str(text).strip()
    if "<noinput>" in text.replace(" ", "").lower():
        return ""
    text = _INPUT_LABEL_RE.sub("", text, count=1).strip()
    # A trailing "Output:" section is the teacher running ahead; the output is asked for separately.
    text = re.split(r"\n\s*\**\s*output\s*\**\s*:", text, maxsplit=1, flags=re.IGNORECASE)[0].strip()
    if not text or _NOINPUT_RE.match(text):
        return ""
    return text


_LABEL_RE = re.compile(r"^\s*\**\s*(?:class\s+label|label|class|output)\s*\**\s*:\s*\**\s*(.*?)\s*\**\s*$", re.IGNORECASE)


def parse_output_first(text: str) -> tuple[str, str] | None:
    """(class label, input) from an output-first reply; None when no label can be found."""
    label = ""
    input_lines: list[str] = []
    in_input = False
    for line in str(text).splitlines():
        m = _LABEL_RE.match(line)
        if m and not label and not in_input:
            label = m.group(1).strip().strip(_QUOTES).strip()
            continue
        if _INPUT_LABEL_RE.match(line):
            in_input = True
            rest = _INPUT_LABEL_RE.sub("", line, count=1).strip()
            if rest:
                input_lines.append(rest)
            continue
        if in_input:
            input_lines.append(line)
    if not label:
        return None
    input_text = "\n".join(input_lines).strip()
    if _NOINPUT_RE.match(input_text) or "<noinput>" in input_text.replace(" ", "").lower():
        input_text = ""
    return label, input_text


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


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z0-9]+")
# Slack on float bounds: a pair is skipped only when its bound is below the threshold by more than this,
# so rounding can never skip a pair whose exact score is above the threshold.
_EPS = 1e-9


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric word tokens: rouge-score's default tokenizer without stemming."""
    return _TOKEN_RE.findall(str(text).lower())


def _bit_masks(tokens: Sequence[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def _lcs_masks(masks: dict[str, int], length: int, other: Sequence[str]) -> int:
    """LCS length of the sequence behind `masks` (of `length` tokens) and `other`, bit-parallel (Hyyrö 2004)."""
    full = (1 << length) - 1
    v = full
    for tok in other:
        m = masks.get(tok)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return length - bin(v).count("1")


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    return _lcs_masks(_bit_masks(a), len(a), b)


def _f1(lcs: int, n: int, m: int) -> float:
    # The same float operations as rouge-score's fmeasure(precision, recall), so scores match bit for bit.
    if lcs == 0 or n == 0 or m == 0:
        return 0.0
    precision, recall = lcs / m, lcs / n
    return 2 * precision * recall / (precision + recall)


def _rouge_l_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    return _f1(_lcs_len(a, b), len(a), len(b))


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts over lowercase word tokens (0.0 if either is empty); equals rouge-score's."""
    return _rouge_l_tokens(tokenize(a), tokenize(b))


class NoveltyFilter:
    """The pool of known texts; a candidate is novel if its best ROUGE-L F1 against the pool is <= threshold.

    Candidate index: an inverted index token -> pool entries. ROUGE-L F1 = 2*LCS/(n+m) and LCS can not
    exceed the multiset overlap o, so F1 > t needs o > t*n/(2-t) shared token occurrences. Any entry
    with that much overlap must contain one of the candidate's (n - o_min + 1) rarest token occurrences,
    so only the posting lists of those rarest tokens are read (prefix filtering); each entry found is
    bounded by its length and overlap, and exact LCS (bit-parallel) runs only where the bound passes t.
    The result is exactly the all-pairs answer; the cost follows the rare tokens, not pool x candidates.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = 0.7) -> None:
        self.threshold = threshold
        self._texts: list[str] = []
        self._lens: list[int] = []
        self._counts: list[dict[str, int]] = []
        self._masks: list[dict[str, int]] = []
        self._postings: dict[str, list[int]] = {}
        self.pairs_scored = 0  # exact LCS computations so far (for benchmarks and metadata)
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        toks = tokenize(text)
        idx = len(self._texts)
        self._texts.append(text)
        self._lens.append(len(toks))
        counts = Counter(toks)
        self._counts.append(dict(counts))
        self._masks.append(_bit_masks(toks))
        for tok in counts:
            self._postings.setdefault(tok, []).append(idx)

    def _score(self, idx: int, toks: list[str]) -> float:
        self.pairs_scored += 1
        lcs = _lcs_masks(self._masks[idx], self._lens[idx], toks)
        return _f1(lcs, len(toks), self._lens[idx])

    def _ranked(self, counts: Counter, n: int, entries: Iterable[int], floor: float) -> list[tuple[float, int]]:
        """(upper bound, entry) for entries sharing a token whose bound is not below `floor`, best bound first."""
        out = []
        for j in entries:
            m = self._lens[j]
            total = n + m
            if 2.0 * min(n, m) / total < floor - _EPS:
                continue
            other = self._counts[j]
            overlap = 0
            for tok, c in counts.items():
                oc = other.get(tok)
                if oc:
                    overlap += c if c < oc else oc
            bound = 2.0 * overlap / total
            if overlap and bound >= floor - _EPS:
                out.append((bound, j))
        out.sort(key=lambda bj: (-bj[0], bj[1]))
        return out

    def _search(self, toks: list[str], entries: Iterable[int], floor: float) -> tuple[float, str | None]:
        best, match = 0.0, None
        for bound, j in self._ranked(Counter(toks), len(toks), entries, floor):
            if bound < max(best, floor) - _EPS:
                break  # sorted by bound: no later entry can beat the best or pass the floor
            score = self._score(j, toks)
            if score > best:
                best, match = score, self._texts[j]
        return best, match

    def _probe_entries(self, toks: list[str]) -> set[int]:
        """Pool entries that could score above the threshold: those holding one of the rarest prefix tokens."""
        n = len(toks)
        t = self.threshold
        min_overlap = max(1, math.floor(t * n / (2.0 - t) - _EPS) + 1)
        if min_overlap > n:
            return set()
        need = n - min_overlap + 1  # token occurrences to probe
        counts = Counter(toks)
        order = sorted(counts, key=lambda tok: (len(self._postings.get(tok, ())), tok))
        entries: set[int] = set()
        covered = 0
        for tok in order:
            entries.update(self._postings.get(tok, ()))
            covered += counts[tok]
            if covered >= need:
                break
        return entries

    def check(self, text: str) -> tuple[bool, float, str | None]:
        """Fast (novel?, score, pool text): the score is exact when not novel, else a lower bound <= threshold."""
        toks = tokenize(text)
        if not toks or not self._texts:
            return True, 0.0, None
        best, match = self._search(toks, self._probe_entries(toks), self.threshold)
        return best <= self.threshold, best, match

    def best_match(self, text: str) -> tuple[float, str | None]:
        """Exact highest ROUGE-L F1 against the pool and the pool text that reached it (branch and bound)."""
        toks = tokenize(text)
        if not toks:
            return 0.0, None
        entries: set[int] = set()
        for tok in set(toks):
            entries.update(self._postings.get(tok, ()))
        return self._search(toks, entries, 0.0)

    def is_novel(self, text: str) -> tuple[bool, float, str | None]:
        """(novel?, exact best score, best-matching pool text)."""
        novel, score, match = self.check(text)
        if novel:
            score, match = self.best_match(text)
        return novel, score, match


def blacklisted_keyword(text: str) -> str | None:
    """The first blacklisted keyword in `text` (whole words; "go to" as a phrase), else None."""
    m = _BLACKLIST_RE.search(text)
    return " ".join(m.group(0).lower().split()) if m else None


def _ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class BenchmarkOverlap:
    """Flags text that shares a 13-word n-gram with a benchmark question or is near-identical to one."""

    def __init__(self, questions: Iterable[str] = (), n: int = BENCHMARK_NGRAM, rouge_threshold: float = 0.7) -> None:
        self.n = n
        self._ngrams: dict[tuple[str, ...], int] = {}
        self._questions = [str(q) for q in questions if str(q).strip()]
        for i, q in enumerate(self._questions):
            for g in _ngrams(tokenize(q), n):
                self._ngrams.setdefault(g, i)
        self._near = NoveltyFilter(self._questions, threshold=rouge_threshold)

    def check(self, text: str, near: bool = True) -> str | None:
        """A human-readable reason if `text` overlaps a benchmark question, else None.

        `near=False` checks only the shared n-gram (for long texts such as a response, where a
        whole-text ROUGE-L against a short question says little).
        """
        if not self._questions:
            return None
        for g in _ngrams(tokenize(text), self.n):
            if g in self._ngrams:
                q = self._questions[self._ngrams[g]]
                return f"shares the {self.n}-gram '{' '.join(g)}' with benchmark question '{_one_line(q, 120)}'"
        if near:
            novel, score, match = self._near.check(text)
            if not novel:
                return f"ROUGE-L {score:.2f} > {self._near.threshold:.2f} vs benchmark question '{_one_line(match or '', 120)}'"
        return None


def _normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def instruction_word_count(text: str) -> int:
    return len(str(text).split())


def response_problem(instruction: str, response: str, min_chars: int) -> tuple[str, str] | None:
    """(reason, detail) if the response is empty or a non-answer, else None."""
    text = str(response).strip()
    if len(text) < max(min_chars, 1):
        return "empty_response", f"response has {len(text)} chars (< {max(min_chars, 1)})"
    norm = _normalize(text)
    if norm == _normalize(instruction):
        return "non_answer", "response repeats the instruction"
    lowered = norm.lstrip(_QUOTES + " ")
    for prefix in REFUSAL_PREFIXES:
        if lowered.startswith(prefix):
            return "non_answer", f"response starts with a refusal ('{prefix}')"
    return None


# --------------------------------------------------------------------------------------------
# Journal: accepted rows persisted as they come, so runs resume and repeat without regenerating
# --------------------------------------------------------------------------------------------


class GenerationJournal:
    """An append-only JSONL file: a header line, then one line per finished round.

    A round line holds everything the round decided (rows, rejects, the instructions that joined the
    pool, counters), so replaying the lines rebuilds the loop's state exactly. Each line is flushed and
    fsynced as its round ends; a torn last line (a crash mid-write) is dropped on load.
    """

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = header

    def load(self) -> list[dict[str, Any]]:
        """Finished rounds recorded so far (empty for a new journal); rewrites a torn file to its valid prefix."""
        if not self.path.exists():
            return []
        good: list[str] = []
        rounds: list[dict[str, Any]] = []
        torn = False
        with self.path.open("r", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.endswith("\n"):
                    torn = True
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    torn = True
                    break
                if i == 0:
                    if record.get("kind") != "header" or record.get("key") != self.header["key"]:
                        raise ValueError(f"{self.path} belongs to another run (header {record!r})")
                elif record.get("kind") != "round" or record.get("round") != len(rounds):
                    torn = True
                    break
                else:
                    rounds.append(record)
                good.append(line)
        if torn:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(good), encoding="utf-8")
            tmp.replace(self.path)
        return rounds

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"kind": "header", **self.header}, sort_keys=True, default=str) + "\n")
            fh.write(json.dumps({"kind": "round", **record}, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def seed_data_version(seed_rows: pd.DataFrame) -> str:
    """Content hash of the seed pool (human seed ids and instructions, every pool instruction), order-free."""
    seeds, pool = _seed_pool(seed_rows)
    return short_hash({"seeds": sorted(seeds), "pool": sorted(pool)})


def generation_key(seed_version: str, teacher_id: str, cfg: SelfInstructConfig, benchmark_questions: Sequence[str]) -> dict[str, Any]:
    """What a run's generations depend on; equal keys mean a journal can be replayed."""
    parts = {
        "seed_data_version": seed_version,
        "teacher": teacher_id,
        "config_hash": short_hash(cfg.generation_fields()),
        "benchmark_hash": short_hash([str(q) for q in benchmark_questions]),
        "prompt_version": PROMPT_VERSION,
        "journal_version": JOURNAL_VERSION,
    }
    return {"key": short_hash(parts), **parts}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

_ROW_EXTRA = (
    "teacher", "seed_ids", "generation_params", "rouge_l_max", "filter_scores", "instruction", "input", "instance_order",
)


def _seed_pool(seed_rows: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str]]:
    """(human seeds as (id, instruction), every existing instruction text)."""
    if seed_rows is None or len(seed_rows) == 0:
        return [], []
    if "origin" not in seed_rows.columns:
        raise ValueError("seed_rows needs an 'origin' column (human seeds are rows with origin == 'human')")
    if "prompt" in seed_rows.columns:
        prompts = seed_rows["prompt"].astype(str).tolist()
    elif "messages" in seed_rows.columns:
        prompts = [schema.flatten_turns(m, "user") for m in seed_rows["messages"]]
    else:
        raise ValueError("seed_rows needs a 'prompt' (or 'messages') column")
    if "id" in seed_rows.columns:
        ids = seed_rows["id"].astype(str).tolist()
    else:
        ids = [schema.conversation_id(m) for m in seed_rows["messages"]]
    origins = seed_rows["origin"].tolist()
    seeds = [(i, p) for i, p, o in zip(ids, prompts, origins) if o == "human" and p.strip()]
    return seeds, [p for p in prompts if p.strip()]


def _empty_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        pd.DataFrame(columns=list(schema.ROW_COLUMNS) + list(_ROW_EXTRA)),
        pd.DataFrame(columns=list(schema.REJECT_COLUMNS)),
    )


def _sample_examples(
    rng: random.Random, seeds: list[tuple[str, str]], synthetic: list[tuple[str, str]], k: int, n_synthetic: int
) -> list[tuple[str, str]]:
    # Self-Instruct shows 8 tasks: 6 human seeds and 2 earlier machine-made ones (once there are any).
    n_syn = min(len(synthetic), n_synthetic)
    n_hum = min(len(seeds), k - n_syn)
    picked = rng.sample(seeds, n_hum) + rng.sample(synthetic, n_syn)
    rng.shuffle(picked)
    return picked


class _State:
    """What the loop has decided so far; rebuilt from the journal on resume."""

    def __init__(self, seeds: list[tuple[str, str]], pool_texts: list[str], cfg: SelfInstructConfig) -> None:
        self.seeds = seeds
        self.novelty = NoveltyFilter(pool_texts, threshold=cfg.rouge_threshold)
        self.seen = {_normalize(t) for t in pool_texts}
        self.synthetic: list[tuple[str, str]] = []  # (id, instruction) of accepted rows, sampled back as examples
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.reasons: Counter = Counter()
        self.checked: Counter = Counter()  # filter -> candidates that reached it
        self.attempts = 0
        self.candidates = 0
        self.rounds = 0

    def apply(self, record: dict[str, Any], live: bool) -> None:
        """Fold one finished round into the state (a live round already added its pool entries)."""
        if not live:
            for instruction in record["pool_added"]:
                self.seen.add(_normalize(instruction))
                self.novelty.add(instruction)
        for row in record["rows"]:
            self.rows.append(row)
            self.synthetic.append((row["id"], row["instruction"]))
        for rej in record["rejects"]:
            self.rejects.append(rej)
            self.reasons[rej["reason"]] += 1
        self.checked.update(record["checked"])
        self.attempts += record["calls"]
        self.candidates += record["candidates"]
        self.rounds += 1


def _run_round(
    round_index: int, state: _State, teacher: Teacher, cfg: SelfInstructConfig, bench: BenchmarkOverlap,
) -> dict[str, Any]:
    """Generate and filter one round; returns its journal record. Adds accepted instructions to the pool."""
    # One RNG per round, derived from (seed, round): a resumed run draws exactly what an uninterrupted one would.
    rng = random.Random(f"self-instruct:{cfg.seed}:{round_index}")
    k = cfg.seed_tasks_per_prompt
    pool_added: list[str] = []
    rejects: list[dict[str, Any]] = []
    checked: Counter = Counter()
    rows: list[dict[str, Any]] = []
    calls = 0
    candidate_index = state.candidates

    def reject(index: int, reason: str, detail: str, raw: Any, id: str | None = None) -> None:
        rejects.append(schema.make_reject(
            source=SOURCE, stage=STAGE, reason=reason, detail=detail, raw=raw, source_index=index, id=id,
        ))

    # 1. New instructions from k sampled pool tasks per prompt.
    examples = [
        _sample_examples(rng, state.seeds, state.synthetic, k, cfg.synthetic_tasks_per_prompt) for _ in range(cfg.batch_size)
    ]
    prompts = [build_instruction_prompt([t for _, t in ex], cfg.new_tasks_per_prompt) for ex in examples]
    instruction_seed = rng.randrange(2**31)
    instance_seed = rng.randrange(2**31)
    response_seed = rng.randrange(2**31)
    calls += 1
    replies = teacher.generate(prompts, cfg.max_new_tokens_instruction, cfg.temperature, cfg.top_p, instruction_seed)

    pending: list[dict[str, Any]] = []
    for ex, reply in zip(examples, replies):
        parsed = parse_instructions(reply, limit=cfg.new_tasks_per_prompt) or [""]
        for instruction in parsed:
            index = candidate_index
            candidate_index += 1
            raw = reply if len(parsed) == 1 else {"reply": reply, "instruction": instruction}
            checked["parse"] += 1
            if not instruction:
                reject(index, "empty_instruction", "teacher reply has no instruction line", raw)
                continue
            n_words = instruction_word_count(instruction)
            checked["length"] += 1
            if n_words < cfg.min_instruction_words:
                reject(index, "too_short", f"instruction has {n_words} words (< {cfg.min_instruction_words})", raw)
                continue
            if n_words > cfg.max_instruction_words:
                reject(index, "too_long", f"instruction has {n_words} words (> {cfg.max_instruction_words})", raw)
                continue
            checked["blacklist"] += 1
            kw = blacklisted_keyword(instruction)
            if kw:
                reject(index, "blacklisted_keyword", f"instruction mentions '{kw}', which a text model cannot do", raw)
                continue
            checked["duplicate"] += 1
            if _normalize(instruction) in state.seen:
                reject(index, "exact_duplicate", "instruction is already in the pool", raw)
                continue
            checked["benchmark_overlap"] += 1
            overlap = bench.check(instruction)
            if overlap:
                reject(index, "benchmark_overlap", f"instruction {overlap}", raw)
                continue
            checked["rouge_l_novelty"] += 1
            novel, score, match = state.novelty.is_novel(instruction)
            if not novel:
                reject(
                    index, "too_similar",
                    f"ROUGE-L {score:.2f} > {cfg.rouge_threshold:.2f} vs pool instruction '{_one_line(match or '', 120)}'",
                    raw,
                )
                continue
            # Join the pool now so later candidates (this round's too) are compared with it; it stays in
            # the pool even if its instance fails below, so the teacher's repeats of it are still caught.
            state.seen.add(_normalize(instruction))
            state.novelty.add(instruction)
            pool_added.append(instruction)
            pending.append({
                "index": index, "instruction": instruction, "rouge": score, "nearest": match,
                "seed_ids": [i for i, _ in ex], "classification": is_classification_task(instruction),
            })

    # 2. Instances: classification tasks output-first (label, then input), the others input-first.
    step2: list[tuple[dict[str, Any], list[dict[str, str]]]] = []
    for cand in pending:
        if cand["classification"]:
            step2.append((cand, build_output_first_prompt(cand["instruction"])))
        elif cfg.generate_inputs:
            step2.append((cand, build_input_prompt(cand["instruction"])))
        else:
            # No input step: the direct answer rides in the same call as the classification instances.
            step2.append((cand, build_response_prompt(cand["instruction"])))
    outputs: list[str] = []
    if step2:
        calls += 1
        max_tokens = cfg.max_new_tokens_instance if cfg.generate_inputs else max(cfg.max_new_tokens_instance, cfg.max_new_tokens_response)
        outputs = teacher.generate([p for _, p in step2], max_tokens, cfg.temperature, cfg.top_p, instance_seed)
    answer_later: list[dict[str, Any]] = []
    ready: list[dict[str, Any]] = []
    for (cand, _), out in zip(step2, outputs):
        if cand["classification"]:
            checked["instance_format"] += 1
            parsed_instance = parse_output_first(out)
            if parsed_instance is None:
                reject(cand["index"], "malformed_instance", "output-first reply has no 'Class label:' line",
                       {"instruction": cand["instruction"], "reply": out})
                continue
            cand.update(order="output_first", input=parsed_instance[1], response=parsed_instance[0],
                        instance_seed=instance_seed, response_seed=None)
            ready.append(cand)
        elif cfg.generate_inputs:
            cand.update(order="input_first", input=parse_input(out), instance_seed=instance_seed, response_seed=response_seed)
            answer_later.append(cand)
        else:
            cand.update(order="no_input", input="", response=str(out).strip(), instance_seed=None, response_seed=instance_seed)
            ready.append(cand)

    # 3. Outputs of input-first instances, written from the instruction and its input.
    if answer_later:
        calls += 1
        answers = teacher.generate(
            [build_response_prompt(c["instruction"], c["input"]) for c in answer_later],
            cfg.max_new_tokens_response, cfg.temperature, cfg.top_p, response_seed,
        )
        for cand, answer in zip(answer_later, answers):
            cand["response"] = str(answer).strip()
            ready.append(cand)
    ready.sort(key=lambda c: c["index"])

    for cand in ready:
        response = cand["response"]
        user = f"{cand['instruction']}\n\n{cand['input']}" if cand["input"] else cand["instruction"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        cid = schema.conversation_id(messages)
        raw = {"instruction": cand["instruction"], "input": cand["input"], "response": response, "seed_ids": cand["seed_ids"]}
        checked["response"] += 1
        problem = response_problem(cand["instruction"], response, cfg.min_response_chars)
        if problem:
            reject(cand["index"], problem[0], problem[1], raw, id=cid)
            continue
        checked["instance_benchmark_overlap"] += 1
        overlap = bench.check(f"{cand['input']}\n{response}", near=False)
        if overlap:
            reject(cand["index"], "instance_benchmark_overlap", f"input or output {overlap}", raw, id=cid)
            continue
        params = {
            "prompt_version": PROMPT_VERSION,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens_instruction": cfg.max_new_tokens_instruction,
            "max_new_tokens_instance": cfg.max_new_tokens_instance,
            "max_new_tokens_response": cfg.max_new_tokens_response,
            "seed_tasks_per_prompt": k,
            "synthetic_tasks_per_prompt": cfg.synthetic_tasks_per_prompt,
            "new_tasks_per_prompt": cfg.new_tasks_per_prompt,
            "config_seed": cfg.seed,
            "round": round_index,
            "instruction_seed": instruction_seed,
            "instance_seed": cand["instance_seed"],
            "response_seed": cand["response_seed"],
            "rouge_threshold": cfg.rouge_threshold,
        }
        scores = {
            "rouge_l_max": float(cand["rouge"]),
            "rouge_l_nearest": cand["nearest"],
            "instruction_words": instruction_word_count(cand["instruction"]),
            "input_chars": len(cand["input"]),
            "response_chars": len(response),
        }
        rows.append(schema.make_row(
            messages, source=SOURCE, origin="synthetic",
            category="classification" if cand["classification"] else None, source_index=cand["index"],
            teacher=teacher.name, seed_ids=cand["seed_ids"], generation_params=json.dumps(params, sort_keys=True),
            rouge_l_max=float(cand["rouge"]), filter_scores=json.dumps(scores, sort_keys=True),
            instruction=cand["instruction"], input=cand["input"], instance_order=cand["order"],
        ))
    return {
        "round": round_index, "calls": calls, "candidates": candidate_index - state.candidates,
        "pool_added": pool_added, "rows": rows, "rejects": rejects, "checked": dict(checked),
    }


def generate_synthetic_instructions(
    seed_rows: pd.DataFrame,
    teacher: Teacher | None,
    cfg: SelfInstructConfig,
    benchmark_questions: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    teacher_id: str | None = None,
    teacher_factory: Callable[[], Teacher] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run Self-Instruct; returns (accepted canonical rows, rejected candidates, stats).

    With `cache_dir`, every finished round is appended to `<cache_dir>/<key>.jsonl`, the key hashing
    the seed data, the teacher (`teacher_id`, else the teacher's fingerprint), the generation config
    (all but num_instructions and max_attempts) and the benchmark. A later call with the same key
    replays the journal and asks the teacher only for rounds it does not have. Round r depends only on
    the seed, r and the rounds before it, so a resumed run returns exactly what an uninterrupted one
    would, and raising the target or the budget extends earlier work. `teacher_factory` builds the
    teacher lazily, only when a round must really be generated (then `teacher_id` is required).
    """
    stats: dict[str, Any] = {
        "attempts": 0, "rounds": 0, "candidates": 0, "accepted": 0, "rejected": 0, "surplus": 0,
        "rejected_by_reason": {}, "filters": [], "stopped": "target_reached", "teacher": None,
        "reused_rounds": 0, "new_rounds": 0, "new_calls": 0, "journal": None, "generation_key": None,
    }
    if cfg.num_instructions == 0:
        accepted, rejected = _empty_frames()
        return accepted, rejected, stats
    if teacher is None and teacher_factory is None:
        raise ValueError("pass a teacher or a teacher_factory")
    seeds, pool_texts = _seed_pool(seed_rows)
    if not seeds:
        raise ValueError("seed_rows has no usable human seed rows (origin == 'human' with a non-empty prompt)")

    benchmark_questions = [str(q) for q in benchmark_questions]
    tid = teacher_id or (teacher_fingerprint(teacher) if teacher is not None else None)
    if tid is None:
        raise ValueError("teacher_id is required with a teacher_factory")
    key = generation_key(seed_data_version(seed_rows), tid, cfg, benchmark_questions)
    journal = GenerationJournal(Path(cache_dir) / f"{key['key']}.jsonl", key) if cache_dir is not None else None
    recorded = journal.load() if journal else []

    state = _State(seeds, pool_texts, cfg)
    bench = BenchmarkOverlap(benchmark_questions, rouge_threshold=cfg.rouge_threshold)

    def keep_going() -> bool:
        if len(state.rows) >= cfg.num_instructions:
            stats["stopped"] = "target_reached"
            return False
        if cfg.max_attempts - state.attempts < cfg.calls_per_round:
            stats["stopped"] = "budget_exhausted"
            return False
        return True

    while keep_going():
        r = state.rounds
        reused = r < len(recorded)
        if reused:
            record = recorded[r]
            stats["reused_rounds"] += 1
        else:
            if teacher is None:
                teacher = teacher_factory()  # type: ignore[misc]
            record = _run_round(r, state, teacher, cfg, bench)
            if journal:
                journal.append(record)  # persisted before the next round starts
            stats["new_rounds"] += 1
            stats["new_calls"] += record["calls"]
        state.apply(record, live=not reused)
        if progress:
            progress({"round": r, "reused": reused, "accepted": len(state.rows), "attempts": state.attempts})

    rows = state.rows[: cfg.num_instructions]
    accepted_df, rejected_df = _empty_frames()
    if rows:
        accepted_df = pd.DataFrame(rows, columns=accepted_df.columns)
    if state.rejects:
        rejected_df = pd.DataFrame(state.rejects, columns=rejected_df.columns)
    filters = []
    for name, reasons in FILTERS:
        n_checked = state.checked.get(name, 0)
        n_rejected = sum(state.reasons[r] for r in reasons)
        filters.append({
            "filter": name, "checked": n_checked, "rejected": n_rejected,
            "pass_rate": round((n_checked - n_rejected) / n_checked, 4) if n_checked else None,
        })
    names = sorted({row["teacher"] for row in state.rows})
    stats.update(
        attempts=state.attempts, rounds=state.rounds, candidates=state.candidates,
        accepted=len(rows), rejected=len(state.rejects), surplus=len(state.rows) - len(rows),
        rejected_by_reason={r: state.reasons[r] for r in REASONS if state.reasons[r]},
        filters=filters,
        teacher=getattr(teacher, "name", None) or (names[0] if names else tid),
        journal=str(journal.path) if journal else None, generation_key=key["key"],
    )
    return accepted_df, rejected_df, stats


# --------------------------------------------------------------------------------------------
# Mixing human and synthetic rows
# --------------------------------------------------------------------------------------------


def mix_human_and_synthetic(human: pd.DataFrame, synthetic: pd.DataFrame, synthetic_ratio: float, seed: int) -> pd.DataFrame:
    """All human rows plus a seeded sample of synthetic rows, so synthetic rows make up `synthetic_ratio` of the result.

    `synthetic_ratio` is the synthetic share of the output, in [0, 1]: 0 keeps human rows only, 0.25 one
    synthetic row for every three human ones, 1 synthetic rows only. Human rows are never dropped for
    ratios below 1; with too few synthetic rows, all of them are used and the achieved share is lower
    (see `result.attrs["mix"]`). Synthetic rows whose id equals a human row's are dropped first. The
    sample is reproducible from `seed` and keeps the synthetic rows' original order.
    """
    ratio = float(synthetic_ratio)
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio!r}")
    human = human if human is not None else pd.DataFrame()
    synthetic = synthetic if synthetic is not None else pd.DataFrame()
    if len(synthetic) and len(human) and "id" in synthetic.columns and "id" in human.columns:
        synthetic = synthetic[~synthetic["id"].isin(set(human["id"]))]
    n_human, n_available = len(human), len(synthetic)
    if ratio >= 1.0:
        keep_human, wanted = 0, n_available
    else:
        keep_human = n_human
        # The largest s with s / (H + s) <= ratio (a tiny slack absorbs float error at exact ratios).
        wanted = math.floor(ratio * n_human / (1.0 - ratio) + 1e-9)
    n_syn = min(wanted, n_available)
    rng = random.Random(f"mix:{seed}")
    picked = sorted(rng.sample(range(n_available), n_syn))
    parts = [p for p in (human.iloc[:keep_human], synthetic.iloc[picked]) if len(p.columns)]
    mixed = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    total = keep_human + n_syn
    mixed.attrs["mix"] = {
        "human_rows": keep_human, "synthetic_rows": n_syn, "synthetic_available": n_available,
        "synthetic_requested": wanted, "synthetic_ratio_requested": ratio,
        "synthetic_ratio_achieved": (n_syn / total) if total else 0.0, "seed": seed,
    }
    return mixed


__all__ = [
    "BLACKLIST", "FILTERS", "REASONS", "SelfInstructConfig", "Teacher", "LocalHFTeacher", "NoveltyFilter",
    "BenchmarkOverlap", "GenerationJournal", "build_instruction_prompt", "build_input_prompt",
    "build_output_first_prompt", "build_response_prompt", "parse_instruction", "parse_instructions", "parse_input",
    "parse_output_first", "is_classification_task", "rouge_l_f1", "tokenize", "blacklisted_keyword",
    "response_problem", "generate_synthetic_instructions", "mix_human_and_synthetic", "seed_data_version",
    "generation_key",
]
