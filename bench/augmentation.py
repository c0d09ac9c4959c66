"""Benchmark: the Self-Instruct novelty filter (candidate index) against an all-pairs rouge-score loop.

Both implementations process the same instruction stream sequentially, as Self-Instruct does: a
candidate is kept when its ROUGE-L F1 against every pool entry (the human seed instructions plus all
candidates kept so far) is <= the threshold, and a kept candidate joins the pool at once. The baseline
is Stanford Alpaca's loop (pre-tokenized with rouge-score's own tokenizer, `rouge_scorer._score_lcs`
against every pool entry, single process). Correctness goal: the identical kept set. Speed goal:
>= 50x faster. Both run in this process, one after the other, so machine noise hits both.

    .venv/bin/python bench/augmentation.py            # 5,000 instructions: ~3 CPU minutes, nearly all baseline
    .venv/bin/python bench/augmentation.py --n 1000   # quick look (~15 CPU seconds)

The ratio is CPU time of this process (time.process_time), so other work on a shared machine does not
skew it; wall seconds are printed beside it.

Needs `rouge-score` (pip install rouge-score), a benchmark-only dependency. Exits 1 if a goal fails.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sft_pipeline.augmentation.novelty import NoveltyFilter  # noqa: E402

VERBS = ["Write", "Explain", "List", "Describe", "Summarize", "Classify", "Give", "Suggest", "Compare", "Translate",
         "Create", "Generate", "Rewrite", "Identify", "Outline", "Name", "Plan", "Draft", "Evaluate", "Predict"]
OBJECTS = ["a short story", "three tips", "a poem", "the main differences", "an email", "a list of ideas",
           "a step by step guide", "the pros and cons", "a one sentence summary", "five questions", "a tweet",
           "a product description", "a short dialogue", "the key facts", "a recipe", "a haiku", "an analogy",
           "a quiz", "a persuasive paragraph", "a simple explanation"]
QUALIFIERS = ["", "", "for a ten year old", "in one sentence", "using simple words", "in a formal tone",
              "for a beginner", "with an example", "in under fifty words", "as a bulleted list",
              "from the point of view of a historian", "for a busy manager", "without technical jargon"]


def seed_instructions() -> list[str]:
    path = ROOT / "sft_pipeline" / "data" / "seed_alpaca.jsonl"
    return [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()]


def topic_words(seeds: list[str]) -> list[str]:
    """Content words from the seed set's responses: a realistic, sizeable topic vocabulary."""
    path = ROOT / "sft_pipeline" / "data" / "seed_alpaca.jsonl"
    words = set()
    for line in path.read_text().splitlines():
        if line.strip():
            for w in json.loads(line)["output"].lower().split():
                w = "".join(c for c in w if c.isalpha())
                if len(w) > 4:
                    words.add(w)
    return sorted(words)


def instruction_stream(n: int, seed: int, near_copy_share: float = 0.35) -> list[str]:
    """n instruction-like texts: fresh ones from templates, and near copies (1-3 word edits) of earlier ones."""
    rng = random.Random(seed)
    topics = topic_words(seed_instructions())
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < near_copy_share:
            words = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                i = rng.randrange(len(words))
                if op < 0.4 and len(words) > 3:
                    words.pop(i)
                elif op < 0.7:
                    words[i] = rng.choice(topics)
                else:
                    words.insert(i, rng.choice(topics))
            out.append(" ".join(words))
        else:
            topic = " ".join(rng.sample(topics, rng.randint(1, 3)))
            text = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} about {topic} {rng.choice(QUALIFIERS)}".strip()
            out.append(text + rng.choice([".", "?", "", "."]))
    return out


def run_baseline(pool_seed: list[str], stream: list[str], threshold: float) -> tuple[list[int], float, float, int]:
    """Stanford Alpaca's filter: rouge-score tokens, _score_lcs against every pool entry."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = scorer._tokenizer.tokenize
    pool_tokens = [tokenize(t) for t in pool_seed]
    kept: list[int] = []
    pairs = 0
    start, cpu = time.perf_counter(), time.process_time()
    for i, text in enumerate(stream):
        toks = tokenize(text)
        pairs += len(pool_tokens)
        best = max((rouge_scorer._score_lcs(toks, other).fmeasure for other in pool_tokens), default=0.0)
        if best <= threshold:
            kept.append(i)
            pool_tokens.append(toks)
    return kept, time.perf_counter() - start, time.process_time() - cpu, pairs


def run_index(pool_seed: list[str], stream: list[str], threshold: float) -> tuple[list[int], float, float, int]:
    start, cpu = time.perf_counter(), time.process_time()
    novelty = NoveltyFilter(pool_seed, threshold=threshold)
    kept: list[int] = []
    for i, text in enumerate(stream):
        if novelty.check(text)[0]:
            kept.append(i)
            novelty.add(text)
    return kept, time.perf_counter() - start, time.process_time() - cpu, novelty.pairs_scored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="candidate instructions in the stream (default 5000)")
    parser.add_argument("--threshold", type=float, default=0.7, help="ROUGE-L F1 above which a candidate is rejected")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instruction stream")
    parser.add_argument("--min-speedup", type=float, default=50.0, help="speed goal (baseline time / index time)")
    args = parser.parse_args()
    try:
        import rouge_score  # noqa: F401
    except ImportError:
        print("rouge-score is needed for the baseline: .venv/bin/pip install rouge-score", file=sys.stderr)
        return 2

    seeds = seed_instructions()
    stream = instruction_stream(args.n, args.seed)
    kept_index, wall_index, t_index, pairs_index = run_index(seeds, stream, args.threshold)
    kept_base, wall_base, t_base, pairs_base = run_baseline(seeds, stream, args.threshold)
    identical = kept_index == kept_base
    # CPU seconds of this process: on a shared machine, wall time also counts other people's work.
    speedup = t_base / t_index if t_index > 0 else float("inf")

    print(f"novelty filter: {len(seeds)} seed instructions + {len(stream)} candidates, threshold {args.threshold}")
    header = f"{'implementation':<42} {'cpu s':>8} {'wall s':>8} {'exact LCS pairs':>16} {'kept':>6} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'baseline: all-pairs rouge-score (Alpaca)':<42} {t_base:>8.2f} {wall_base:>8.2f} {pairs_base:>16,} {len(kept_base):>6} {'1.0x':>8}")
    print(f"{'sft_pipeline NoveltyFilter (index)':<42} {t_index:>8.2f} {wall_index:>8.2f} {pairs_index:>16,} {len(kept_index):>6} {speedup:>7.1f}x")
    print()
    print(f"identical kept set: {identical}   speedup: {speedup:.1f}x (goal >= {args.min_speedup:.0f}x)")
    failures = []
    if not identical:
        diff = sorted(set(kept_index) ^ set(kept_base))[:5]
        failures.append(f"kept sets differ (first differing candidates: {[stream[i] for i in diff]})")
    if speedup < args.min_speedup:
        failures.append(f"speedup {speedup:.1f}x below the goal {args.min_speedup:.0f}x")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
