"""Benchmark of the curation stage on a synthetic corpus with planted exact and near duplicates.

    .venv/bin/python bench/curation.py                 # 200,000 rows (a few minutes on 2 cores)
    .venv/bin/python bench/curation.py --rows 1000000  # the scale goal
    .venv/bin/python bench/curation.py --rows 20000 --baseline-rows 20000   # a quick look

It writes the corpus as Alpaca JSONL, runs the whole stage (`load_sources` then
`clean_instructions`, MMLU-style decontamination included), then runs near-deduplication alone
twice on the same texts: the vectorized `sft_pipeline.curation.dedup.near_duplicates` and the plain
per-row datasketch loop (`MinHash.update_batch`, `MinHashLSH.query`, `insert`) that the stage
used before. It prints rows/s, near-duplicate recall, planted distinct rows wrongly removed and
peak RSS, and exits 1 when a goal fails: recall >= 0.95, no distinct row removed, vectorized
near-dedup faster than the plain loop.

Ground truth: each planted near duplicate is a copy of a distinct row with a few words replaced,
inserted or dropped in the response; its true shingle Jaccard with the original is computed here
with Python sets (independently of the stage), and only copies at or above the threshold count
for recall (the others are reported). Distinct rows come from a Zipf vocabulary, a fifth of them
sharing templated prompts, so LSH sees realistic false candidates.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sft_pipeline.curation.clean import clean_instructions  # noqa: E402
from sft_pipeline.curation.config import CurationConfig  # noqa: E402
from sft_pipeline.curation.dedup import near_duplicates  # noqa: E402
from sft_pipeline.ingest.sources import SourceSpec, load_sources  # noqa: E402

TEMPLATES = [
    "Translate the following sentence into French and explain any idioms it uses:",
    "Summarize the following paragraph in two sentences for a busy manager:",
    "Classify the sentiment of this customer review as positive, negative or neutral:",
    "Rewrite the following text so that a ten year old child can understand it:",
]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size=size)
    return np.array(["".join(rng.choice(letters, size=n)) for n in lengths])


class WordStream:
    """Zipf-distributed words, drawn in large blocks (one rng.choice per block, not per sentence)."""

    def __init__(self, rng: np.random.Generator, vocab: np.ndarray, probs: np.ndarray, block: int = 1_000_000):
        self.rng, self.vocab, self.probs, self.block = rng, vocab, probs, block
        self.buffer: list[str] = []
        self.at = 0

    def take(self, n: int) -> list[str]:
        if self.at + n > len(self.buffer):
            self.buffer = self.vocab[self.rng.choice(len(self.vocab), size=self.block, p=self.probs)].tolist()
            self.at = 0
        self.at += n
        return self.buffer[self.at - n : self.at]


def edit_words(rng: np.random.Generator, tokens: list[str], vocab: np.ndarray, edits: int) -> list[str]:
    tokens = list(tokens)
    for _ in range(edits):
        kind = rng.integers(3)
        at = int(rng.integers(len(tokens)))
        if kind == 0:
            tokens[at] = str(vocab[rng.integers(len(vocab))])
        elif kind == 1:
            tokens.insert(at, str(vocab[rng.integers(len(vocab))]))
        elif len(tokens) > 5:
            del tokens[at]
    return tokens


_WORD = re.compile(r"\w+")


def shingles(text: str, n: int) -> set[str]:
    tokens = _WORD.findall(text.casefold())
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def conversation_text(prompt: str, response: str) -> str:
    return f"user: {prompt}\nassistant: {response}"


def generate(rows: int, seed: int, exact_share: float, near_share: float, threshold: float, shingle_words: int):
    """Records (alpaca dicts) and ground truth: kind per record and, for near copies, the original and true Jaccard."""
    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(rng, 30_000)
    ranks = np.arange(1, len(vocab) + 1)
    probs = 1.0 / ranks**0.9
    probs /= probs.sum()
    n_exact = int(rows * exact_share)
    n_near = int(rows * near_share)
    n_distinct = rows - n_exact - n_near
    stream = WordStream(rng, vocab, probs)
    distinct = []
    for i in range(n_distinct):
        words = stream.take(int(rng.integers(6, 20)))
        prompt = " ".join(words).capitalize() + "?"
        if i % 5 == 0:
            prompt = f"{TEMPLATES[i % len(TEMPLATES)]} {prompt}"
        response = stream.take(int(rng.integers(30, 110)))
        distinct.append((prompt, response))
    records, kinds, originals, true_jaccard = [], [], [], []
    for prompt, response in distinct:
        records.append({"instruction": prompt, "input": "", "output": " ".join(response).capitalize() + "."})
        kinds.append("distinct")
        originals.append(-1)
        true_jaccard.append(np.nan)
    for _ in range(n_exact):
        k = int(rng.integers(n_distinct))
        prompt, response = distinct[k]
        records.append({"instruction": "  " + prompt.upper(), "input": "", "output": " ".join(response).capitalize() + ".  \n"})
        kinds.append("exact")
        originals.append(k)
        true_jaccard.append(1.0)
    for _ in range(n_near):
        k = int(rng.integers(n_distinct))
        prompt, response = distinct[k]
        edited = edit_words(rng, response, vocab, int(rng.integers(1, 3)))
        output = " ".join(edited).capitalize() + "."
        original = conversation_text(prompt, " ".join(response).capitalize() + ".")
        a, b = shingles(original, shingle_words), shingles(conversation_text(prompt, output), shingle_words)
        records.append({"instruction": prompt, "input": "", "output": output})
        kinds.append("near")
        originals.append(k)
        true_jaccard.append(len(a & b) / len(a | b))
    # Originals must come first in input order for "the first survives" to make them the survivors.
    order = np.concatenate([np.arange(n_distinct), rng.permutation(np.arange(n_distinct, len(records)))])
    return [records[i] for i in order], np.array(kinds)[order], np.array(true_jaccard)[order], np.array(originals)[order]


def benchmark_items(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """MMLU-like items in a vocabulary of their own (so no corpus row is contaminated by chance)."""
    vocab = np.array([f"q{w}" for w in make_vocabulary(rng, 5000)])
    items = []
    for i in range(count):
        question = " ".join(vocab[rng.integers(len(vocab), size=20)])
        choices = "\n".join(" ".join(vocab[rng.integers(len(vocab), size=4)]) for _ in range(4))
        items.append((f"bench-{i}", question + "\n" + choices))
    return items


def datasketch_loop(texts: list[str], cfg: CurationConfig) -> dict[int, int]:
    """The plain per-row loop: one MinHash per text, query, insert the survivors."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.num_perm)
    duplicates: dict[int, int] = {}
    for i, text in enumerate(texts):
        signature = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        signature.update_batch([s.encode("utf-8") for s in shingles(text, cfg.shingle_words)])
        found = lsh.query(signature)
        if found:
            duplicates[i] = min(found)
            continue
        lsh.insert(i, signature)
    return duplicates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="corpus size (>= 200,000 for the goal)")
    parser.add_argument("--exact-share", type=float, default=0.05)
    parser.add_argument("--near-share", type=float, default=0.10)
    parser.add_argument("--benchmark-items", type=int, default=2000, help="MMLU-like items for decontamination; 1%% of distinct rows quote one")
    parser.add_argument("--baseline-rows", type=int, default=0, help="texts given to both near-dedup implementations; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = CurationConfig()
    print(f"generating {args.rows:,} rows ...", flush=True)
    records, kinds, true_jaccard, originals = generate(args.rows, args.seed, args.exact_share, args.near_share, cfg.near_dedup_threshold, cfg.shingle_words)
    rng = np.random.default_rng(args.seed + 1)
    items = benchmark_items(rng, args.benchmark_items)
    copied = np.zeros(len(kinds), dtype=bool)
    copied[originals[originals >= 0]] = True
    contaminated = set(rng.choice(np.flatnonzero((kinds == "distinct") & ~copied), size=max(1, int((kinds == "distinct").sum() * 0.01)), replace=False).tolist())
    for i in contaminated:
        item = items[int(rng.integers(len(items)))][1].split("\n")[0]
        records[i]["output"] += " As the quiz asked: " + item
    kinds = kinds.astype(object)
    for i in contaminated:
        kinds[i] = "contaminated"

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        del records
        start = time.perf_counter()
        ingest = load_sources([SourceSpec(str(path), name="bench")])
        ingest_s = time.perf_counter() - start
        rss_ingest = peak_rss_mib()
        start = time.perf_counter()
        kept, rejected, report = clean_instructions(ingest.rows, cfg, items)
        clean_s = time.perf_counter() - start
        rss_stage = peak_rss_mib()

    reason = np.array([None] * args.rows, dtype=object)
    for index, why in zip(rejected["source_index"], rejected["reason"]):
        reason[int(index) - 1] = why
    near_mask = (kinds == "near") & (true_jaccard >= cfg.near_dedup_threshold)
    near_below = int(((kinds == "near") & (true_jaccard < cfg.near_dedup_threshold)).sum())
    recall = float(np.isin(reason[near_mask], ["near_duplicate", "exact_duplicate"]).mean()) if near_mask.any() else 1.0
    exact_recall = float((reason[kinds == "exact"] == "exact_duplicate").mean()) if (kinds == "exact").any() else 1.0
    distinct_removed = int(sum(r is not None for r in reason[kinds == "distinct"]))
    contamination_recall = float((reason[kinds == "contaminated"] == "benchmark_contamination").mean())

    # Near-dedup alone, both implementations on the same texts (exact duplicates left out).
    texts = [f"user: {p}\nassistant: {r}" for p, r, k in zip(ingest.rows["prompt"], ingest.rows["response"], kinds) if k != "exact"]
    if args.baseline_rows:
        texts = texts[: args.baseline_rows]
    del ingest, kept
    start = time.perf_counter()
    ours, candidates = near_duplicates(texts, cfg)
    ours_s = time.perf_counter() - start
    rss_ours = peak_rss_mib()
    start = time.perf_counter()
    theirs = datasketch_loop(texts, cfg)
    theirs_s = time.perf_counter() - start
    agree = len(set(ours) & set(theirs))

    rows_in = args.rows
    table = [
        ("whole stage: ingest (JSONL -> rows)", f"{rows_in / ingest_s:,.0f} rows/s", f"{ingest_s:.1f} s"),
        ("whole stage: clean_instructions", f"{rows_in / clean_s:,.0f} rows/s", f"{clean_s:.1f} s"),
        ("whole stage: both", f"{rows_in / (ingest_s + clean_s):,.0f} rows/s", f"{ingest_s + clean_s:.1f} s"),
        (f"near-dedup vectorized ({len(texts):,} texts)", f"{len(texts) / ours_s:,.0f} rows/s", f"{ours_s:.1f} s"),
        (f"near-dedup datasketch loop, baseline ({len(texts):,} texts)", f"{len(texts) / theirs_s:,.0f} rows/s", f"{theirs_s:.1f} s"),
        ("speed-up vs baseline", f"{theirs_s / ours_s:.2f}x", ""),
    ]
    width = max(len(r[0]) for r in table)
    print()
    print(f"{'measure':<{width}}  {'rate':>16}  {'time':>9}")
    for name, rate, secs in table:
        print(f"{name:<{width}}  {rate:>16}  {secs:>9}")
    print()
    print(f"phases (s): {report.seconds_per_phase}; LSH bands x rows: {report.lsh_bands}; candidate rows: {candidates:,}")
    print(f"kept {report.kept:,} / {rows_in:,}; rejected per reason: {report.rejected_by_reason}")
    print(f"planted near duplicates with true Jaccard >= {cfg.near_dedup_threshold}: {int(near_mask.sum()):,} (below: {near_below:,})")
    print(f"near-duplicate recall (whole stage): {recall:.4f}   exact-duplicate recall: {exact_recall:.4f}   contamination recall: {contamination_recall:.4f}")
    print(f"planted distinct rows wrongly removed: {distinct_removed}")
    print(f"near-dedup alone: vectorized found {len(ours):,}, datasketch loop found {len(theirs):,}, both {agree:,}")
    print(f"peak RSS MiB: after ingest {rss_ingest:,.0f}, after stage {rss_stage:,.0f}, after vectorized near-dedup {rss_ours:,.0f}, after baseline {peak_rss_mib():,.0f}")

    goals = {
        "recall >= 0.95": recall >= 0.95,
        "no distinct row removed": distinct_removed == 0,
        "exact duplicates all removed": exact_recall == 1.0,
        "contaminated rows all removed": contamination_recall == 1.0,
        "near-dedup faster than the datasketch loop": ours_s < theirs_s,
    }
    for goal, ok in goals.items():
        print(f"[{'PASS' if ok else 'FAIL'}] {goal}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
