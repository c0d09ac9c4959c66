"""Self-Instruct augmentation: a teacher LLM grows the human seed set with filtered synthetic rows.

Plain domain logic (no Dagster). The loop follows Self-Instruct (Wang et al. 2022) and Stanford
Alpaca: show the teacher a few sampled pool tasks, ask for one new task, answer it, and keep the
pair only if it passes every filter. Each discarded candidate becomes a reject row with a reason.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import pandas as pd

from sft_pipeline import schema

SOURCE = "self_instruct"
STAGE = "augmentation"
# Bumped whenever the prompt wording changes, so provenance tells which prompt made a row.
PROMPT_VERSION = "self_instruct_v1"

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

# Reason codes written to rejected rows (one per filter).
REASONS = (
    "empty_instruction", "too_short", "too_long", "blacklisted_keyword", "exact_duplicate",
    "benchmark_overlap", "too_similar", "empty_response", "non_answer",
)


@dataclass
class SelfInstructConfig:
    """Settings of one Self-Instruct run; defaults fit the CPU demo."""

    num_instructions: int = field(default=4, metadata={"help": "Target number of accepted synthetic rows; 0 skips generation."})
    max_attempts: int = field(default=8, metadata={"help": "Budget of teacher.generate calls (instruction and response calls both count)."})
    seed_tasks_per_prompt: int = field(default=4, metadata={"help": "Example tasks shown to the teacher in each instruction prompt."})
    max_new_tokens_instruction: int = field(default=48, metadata={"help": "Token limit when the teacher writes a new instruction."})
    max_new_tokens_response: int = field(default=128, metadata={"help": "Token limit when the teacher answers an instruction."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    rouge_threshold: float = field(default=0.7, metadata={"help": "Reject a candidate whose ROUGE-L F1 to any pool or benchmark text is above this."})
    min_instruction_words: int = field(default=3, metadata={"help": "Reject instructions with fewer words."})
    max_instruction_words: int = field(default=150, metadata={"help": "Reject instructions with more words."})
    min_response_chars: int = field(default=2, metadata={"help": "Reject responses shorter than this (after stripping)."})
    seed: int = field(default=0, metadata={"help": "Seed for seed-task sampling and teacher sampling; same seed, same output."})
    batch_size: int = field(default=4, metadata={"help": "Instruction prompts per teacher call."})

    def __post_init__(self) -> None:
        minimums = {
            "num_instructions": 0, "max_attempts": 0, "seed_tasks_per_prompt": 1, "max_new_tokens_instruction": 1,
            "max_new_tokens_response": 1, "min_instruction_words": 0, "max_instruction_words": 1,
            "min_response_chars": 0, "batch_size": 1,
        }
        for name, lowest in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {value}")
        if self.num_instructions > 0 and self.max_attempts < 2:
            # One round needs a call for the instructions and one for their responses.
            raise ValueError(f"max_attempts must be >= 2 when num_instructions > 0, got {self.max_attempts}")
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

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for Dagster config descriptions and docs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Teacher(Protocol):
    """Anything that turns chat-message prompts into completions."""

    name: str

    def generate(
        self, prompts: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        """One completion (new text only) per prompt, deterministic for a given seed."""
        ...


class LocalHFTeacher:
    """A Hugging Face causal LM loaded from a local folder, prompted through its chat template."""

    def __init__(self, model_dir: str | Path, name: str | None = None, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # Decoder-only generation needs left padding so every row's new tokens start at the same column.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir).to(self.device)
        self.model.eval()

    def generate(
        self, prompts: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        import torch

        if not prompts:
            return []
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        # The template already adds BOS/role markers; adding special tokens again would double them.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False)
        # fork_rng keeps the caller's global RNG state untouched while we reseed for determinism.
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# Prompts and parsing
# --------------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def build_instruction_prompt(seed_instructions: list[str]) -> list[dict[str, str]]:
    """A user message listing the example tasks and asking for one new, different task."""
    examples = "\n".join(f"{i}. {_one_line(t)}" for i, t in enumerate(seed_instructions, 1))
    content = (
        "Here are some example tasks:\n"
        f"{examples}\n\n"
        "Write one new task that is different from all of the examples above. "
        "Reply with the task only, on a single line."
    )
    return [{"role": "user", "content": content}]


def build_response_prompt(instruction: str) -> list[dict[str, str]]:
    """The instruction as a single user turn."""
    return [{"role": "user", "content": instruction}]


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


def parse_instruction(text: str) -> str:
    """The first instruction line of a teacher reply, without numbering, bullets, quotes, "Task:" or "Here's a task:"."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        # Small chat models often open with a lead-in line ("Here's a new task:"); the task follows it.
        if line.endswith(":") and i + 1 < len(lines):
            continue
        cleaned = _strip_decorations(line)
        if cleaned:
            return cleaned
    return ""


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric word tokens (the rouge-score default tokenizer, without stemming)."""
    return _TOKEN_RE.findall(str(text).lower())


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _rouge_l_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    if not a or not b:
        return 0.0
    lcs = _lcs_len(a, b)
    # F1 of precision lcs/len(b) and recall lcs/len(a) simplifies to this.
    return 2.0 * lcs / (len(a) + len(b))


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts over lowercase word tokens (0.0 if either is empty)."""
    return _rouge_l_tokens(tokenize(a), tokenize(b))


class NoveltyFilter:
    """The pool of known instructions; a candidate is novel if its best ROUGE-L F1 is <= threshold.

    A linear scan with cheap upper bounds; a faster index can replace this class behind the same API.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = 0.7) -> None:
        self.threshold = threshold
        self._texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._counts: list[Counter] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        toks = tokenize(text)
        self._texts.append(text)
        self._tokens.append(toks)
        self._counts.append(Counter(toks))

    def best_match(self, text: str) -> tuple[float, str | None]:
        """Highest ROUGE-L F1 against the pool and the pool text that reached it."""
        toks = tokenize(text)
        if not toks:
            return 0.0, None
        counts = Counter(toks)
        best, match = 0.0, None
        for other, other_toks, other_counts in zip(self._texts, self._tokens, self._counts):
            n = len(toks) + len(other_toks)
            # LCS can't exceed the bag-of-words overlap, so skip pairs that can't beat the best so far.
            if 2.0 * min(len(toks), len(other_toks)) / n <= best:
                continue
            if 2.0 * sum((counts & other_counts).values()) / n <= best:
                continue
            score = _rouge_l_tokens(toks, other_toks)
            if score > best:
                best, match = score, other
        return best, match

    def is_novel(self, text: str) -> tuple[bool, float, str | None]:
        """(novel?, best score, best-matching pool text)."""
        score, match = self.best_match(text)
        return score <= self.threshold, score, match


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

    def check(self, text: str) -> str | None:
        """A human-readable reason if `text` overlaps a benchmark question, else None."""
        if not self._questions:
            return None
        for g in _ngrams(tokenize(text), self.n):
            if g in self._ngrams:
                q = self._questions[self._ngrams[g]]
                return f"shares the {self.n}-gram '{' '.join(g)}' with benchmark question '{_one_line(q, 120)}'"
        novel, score, match = self._near.is_novel(text)
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
# The loop
# --------------------------------------------------------------------------------------------

_ROW_EXTRA = ("teacher", "seed_ids", "generation_params", "rouge_l_max")


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
    rng: random.Random, seeds: list[tuple[str, str]], synthetic: list[tuple[str, str]], k: int
) -> list[tuple[str, str]]:
    # Self-Instruct mixes a few machine-made tasks into mostly human examples for diversity.
    n_syn = min(len(synthetic), k // 4)
    n_hum = min(len(seeds), k - n_syn)
    picked = rng.sample(seeds, n_hum) + rng.sample(synthetic, n_syn)
    rng.shuffle(picked)
    return picked


def generate_synthetic_instructions(
    seed_rows: pd.DataFrame,
    teacher: Teacher,
    cfg: SelfInstructConfig,
    benchmark_questions: Sequence[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run Self-Instruct; returns (accepted canonical rows, rejected candidates, stats)."""
    stats: dict[str, Any] = {
        "attempts": 0, "rounds": 0, "candidates": 0, "accepted": 0, "rejected": 0,
        "rejected_by_reason": {}, "stopped": "target_reached", "teacher": None,
    }
    if cfg.num_instructions == 0:
        accepted, rejected = _empty_frames()
        return accepted, rejected, stats

    stats["teacher"] = teacher.name
    seeds, pool_texts = _seed_pool(seed_rows)
    if not seeds:
        raise ValueError("seed_rows has no usable human seed rows (origin == 'human' with a non-empty prompt)")

    rng = random.Random(cfg.seed)
    novelty = NoveltyFilter(pool_texts, threshold=cfg.rouge_threshold)
    bench = BenchmarkOverlap(benchmark_questions, rouge_threshold=cfg.rouge_threshold)
    seen = {_normalize(t) for t in pool_texts}
    synthetic: list[tuple[str, str]] = []  # (id, instruction) of accepted rows, sampled back as examples
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    reasons: Counter = Counter()
    k = cfg.seed_tasks_per_prompt

    def reject(index: int, reason: str, detail: str, raw: Any, id: str | None = None) -> None:
        reasons[reason] += 1
        rejects.append(schema.make_reject(
            source=SOURCE, stage=STAGE, reason=reason, detail=detail, raw=raw, source_index=index, id=id,
        ))

    while len(rows) < cfg.num_instructions:
        if cfg.max_attempts - stats["attempts"] < 2:
            stats["stopped"] = "budget_exhausted"
            break
        stats["rounds"] += 1
        examples = [_sample_examples(rng, seeds, synthetic, k) for _ in range(cfg.batch_size)]
        prompts = [build_instruction_prompt([t for _, t in ex]) for ex in examples]
        call_seed = rng.randrange(2**31)
        stats["attempts"] += 1
        raw_outputs = teacher.generate(prompts, cfg.max_new_tokens_instruction, cfg.temperature, cfg.top_p, call_seed)

        pending: list[dict[str, Any]] = []
        for ex, raw in zip(examples, raw_outputs):
            index = stats["candidates"]
            stats["candidates"] += 1
            instruction = parse_instruction(raw)
            n_words = instruction_word_count(instruction)
            if not instruction:
                reject(index, "empty_instruction", "teacher reply has no instruction line", raw)
                continue
            if n_words < cfg.min_instruction_words:
                reject(index, "too_short", f"instruction has {n_words} words (< {cfg.min_instruction_words})", raw)
                continue
            if n_words > cfg.max_instruction_words:
                reject(index, "too_long", f"instruction has {n_words} words (> {cfg.max_instruction_words})", raw)
                continue
            kw = blacklisted_keyword(instruction)
            if kw:
                reject(index, "blacklisted_keyword", f"instruction mentions '{kw}', which a text model cannot do", raw)
                continue
            if _normalize(instruction) in seen:
                reject(index, "exact_duplicate", "instruction is already in the pool", raw)
                continue
            overlap = bench.check(instruction)
            if overlap:
                reject(index, "benchmark_overlap", f"instruction {overlap}", raw)
                continue
            novel, score, match = novelty.is_novel(instruction)
            if not novel:
                reject(
                    index, "too_similar",
                    f"ROUGE-L {score:.2f} > {cfg.rouge_threshold:.2f} vs pool instruction '{_one_line(match or '', 120)}'",
                    raw,
                )
                continue
            # Join the pool now so later candidates in the same batch are compared with this one too.
            seen.add(_normalize(instruction))
            novelty.add(instruction)
            pending.append({
                "index": index, "instruction": instruction, "rouge": score,
                "seed_ids": [i for i, _ in ex], "instruction_seed": call_seed,
            })

        if not pending:
            continue
        response_seed = rng.randrange(2**31)
        stats["attempts"] += 1
        responses = teacher.generate(
            [build_response_prompt(p["instruction"]) for p in pending],
            cfg.max_new_tokens_response, cfg.temperature, cfg.top_p, response_seed,
        )
        for cand, response in zip(pending, responses):
            if len(rows) >= cfg.num_instructions:
                break  # target met mid-batch: leave the rest unused rather than overshoot
            response = str(response).strip()
            messages = [{"role": "user", "content": cand["instruction"]}, {"role": "assistant", "content": response}]
            cid = schema.conversation_id(messages)
            raw = {"instruction": cand["instruction"], "response": response, "seed_ids": cand["seed_ids"]}
            problem = response_problem(cand["instruction"], response, cfg.min_response_chars)
            if problem:
                reject(cand["index"], problem[0], problem[1], raw, id=cid)
                continue
            params = {
                "prompt_version": PROMPT_VERSION,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "max_new_tokens_instruction": cfg.max_new_tokens_instruction,
                "max_new_tokens_response": cfg.max_new_tokens_response,
                "seed_tasks_per_prompt": k,
                "config_seed": cfg.seed,
                "instruction_seed": cand["instruction_seed"],
                "response_seed": response_seed,
                "rouge_threshold": cfg.rouge_threshold,
            }
            rows.append(schema.make_row(
                messages, source=SOURCE, origin="synthetic", category=None, source_index=cand["index"],
                teacher=teacher.name, seed_ids=cand["seed_ids"],
                generation_params=json.dumps(params, sort_keys=True), rouge_l_max=float(cand["rouge"]),
            ))
            synthetic.append((cid, cand["instruction"]))

    accepted_df, rejected_df = _empty_frames()
    if rows:
        accepted_df = pd.DataFrame(rows, columns=accepted_df.columns)
    if rejects:
        rejected_df = pd.DataFrame(rejects, columns=rejected_df.columns)
    stats.update(
        accepted=len(rows), rejected=len(rejects),
        rejected_by_reason={r: reasons[r] for r in REASONS if reasons[r]},
    )
    return accepted_df, rejected_df, stats


__all__ = [
    "BLACKLIST", "REASONS", "SelfInstructConfig", "Teacher", "LocalHFTeacher", "NoveltyFilter", "BenchmarkOverlap",
    "build_instruction_prompt", "build_response_prompt", "parse_instruction", "rouge_l_f1", "tokenize",
    "blacklisted_keyword", "response_problem", "generate_synthetic_instructions",
]
