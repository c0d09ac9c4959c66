"""Training throughput benchmark: padding-free / packed batches against plain padded TRL batches.

Every mode trains the same model on the same tokenized rows with the same optimizer settings, in
its own process (so peak memory is measured cleanly), through `sft_pipeline.training.build_trainer`
(TRL `SFTTrainer`). The baseline, `padded`, is a plain SFTTrainer with padded micro-batches and
SDPA attention; `padding_free` concatenates each micro-batch into one row with position_ids (SDPA
block-diagonal mask on CPU, FlashAttention-2 varlen on CUDA when flash-attn is installed);
`packed` packs rows best-fit-decreasing into fixed-length blocks.

Reported per mode: useful (non-pad) tokens/s measured after warm-up steps, seconds per step, peak
memory (CUDA: max allocated; CPU: peak RSS of the worker process), the share of pad tokens the
model saw, and on CUDA the MFU. Speed-up = tokens/s over the padded baseline's, same run.

    .venv/bin/python bench/training.py                       # tiny random model, CPU-friendly
    .venv/bin/python bench/training.py --model artifacts/base_model/<hash> --steps 12 --batch 8
    .venv/bin/python bench/training.py --model HuggingFaceTB/SmolLM2-360M-Instruct --liger   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("padded", "padding_free", "packed")


def build_rows(model_dir: str, out_dir: Path, n_rows: int, max_length: int, seed: int = 0) -> Path:
    """Tokenize the packaged seed instructions (chat template, labels on the answer only) to train.parquet.

    The rows keep their natural length spread (what makes padding costly); the set is repeated
    until it has `n_rows` rows.
    """
    import random

    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in (REPO / "sft_pipeline" / "data" / "seed_alpaca.jsonl").read_text().splitlines()
               if line.strip()]
    rng = random.Random(seed)
    rows = []
    while len(rows) < n_rows:
        r = rng.choice(records)
        prompt = (r.get("instruction", "") + ("\n\n" + r["input"] if r.get("input") else "")).strip()
        messages = [{"role": "user", "content": prompt}]
        prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": r.get("output", "")}], tokenize=False)
        p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
        labels = ([-100] * len(p_ids) + ids[len(p_ids):])[: len(ids)]
        if all(x == -100 for x in labels):
            continue
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "length": len(ids)})
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out_dir / "train.parquet", index=False)
    return out_dir


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process: train `steps` steps, time the ones after `warmup`."""
    import torch
    from transformers import TrainerCallback

    from sft_pipeline.training import TrainingConfig, build_trainer, count_parameters, model_flops_utilization, peak_memory_mib

    cfg = TrainingConfig(
        model_dir=args.model, dataset_dir=args.data, output_dir=args.out, method=args.method, batching=args.mode,
        packing_length=args.packing_length, max_steps=args.steps,
        per_device_train_batch_size=1 if args.mode == "packed" else args.batch,
        learning_rate=1e-4, warmup_ratio=0.0, save_steps=10**6, save_total_limit=1, eval_steps=10**6,
        early_stopping_patience=0, load_best_model_at_end=False, resume=False, seed=0,
        gradient_checkpointing=args.gradient_checkpointing, use_liger_kernel=args.liger and args.mode != "padded",
        attn_implementation="sdpa" if args.mode == "padded" else None, launcher="python",
    )

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = []  # (step, time, non-pad tokens seen)

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    timer = Timer()
    trainer, _, _ = build_trainer(cfg, callbacks=[timer])
    collate = trainer.data_collator

    counts = {"real": 0, "total": 0}

    def counting_collator(examples):  # every token the model processes, pads included
        batch = collate(examples)
        counts["total"] += int(batch["input_ids"].numel())
        counts["real"] += sum(len(e["input_ids"]) for e in examples)
        return batch

    trainer.data_collator = counting_collator
    trainable, total = count_parameters(trainer.model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = [m for m in timer.marks if m[0] >= args.warmup]
    if len(timed) < 2:
        raise SystemExit(f"--steps must exceed --warmup + 1 (got {args.steps}, {args.warmup})")
    (s0, t0, n0), (s1, t1, n1) = timed[0], timed[-1]
    tps = (n1 - n0) / (t1 - t0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "mode": args.mode,
        "attn_implementation": trainer.model.config._attn_implementation,
        "liger": cfg.use_liger_kernel,
        "tokens_per_second": round(tps, 1),
        "seconds_per_step": round((t1 - t0) / (s1 - s0), 4),
        "pad_share": round(1 - counts["real"] / max(counts["total"], 1), 4),
        "peak_memory_mib": peak_memory_mib(),
        "mfu": model_flops_utilization(tps, total, trainable, cfg.gradient_checkpointing, 1, None, device)
        if device != "cpu" else None,
        "device": device,
        "timed_steps": s1 - s0,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model folder (default: a tiny random Llama built on the spot)")
    parser.add_argument("--data", default=None, help="folder with train.parquet (default: the seed set, tokenized)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}; 'padded' is the baseline")
    parser.add_argument("--method", default="lora", choices=("lora", "full", "freeze", "qlora"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--packing-length", type=int, default=None,
                        help="packed mode: tokens per packed row, one row per micro-batch (default: --batch x the mean "
                             "row length, so every mode trains about the same tokens per step)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--liger", action="store_true", help="Liger kernels for the non-baseline modes (CUDA)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    if args.model is None:
        from tests.tiny_model import build_tiny_model

        args.model = str(build_tiny_model(tmp / "tiny_model"))
    if args.data is None:
        args.data = str(build_rows(args.model, tmp / "data", args.rows, args.max_length))
    if args.packing_length is None:
        import pyarrow.parquet as pq

        lengths = pq.read_table(Path(args.data) / "train.parquet", columns=["input_ids"]).column(0).to_pylist()
        mean = sum(map(len, lengths)) / len(lengths)
        args.packing_length = int(-(-args.batch * mean // 64) * 64)
    print(f"model {args.model}  method {args.method}  batch {args.batch} (packed: 1 row of {args.packing_length} tokens)  "
          f"steps {args.steps} (timed after {args.warmup})", flush=True)
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
        command = [sys.executable, __file__, "--worker", "--mode", mode, "--out", str(tmp / f"out_{mode}"),
                   "--model", args.model, "--data", args.data, "--method", args.method, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--packing-length", str(args.packing_length)]
        command += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--liger"] * args.liger
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{mode}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  {mode}: {results[-1]['tokens_per_second']:.1f} tokens/s, peak {results[-1]['peak_memory_mib']:.0f} MiB",
              flush=True)

    base = next((r for r in results if r["mode"] == "padded"), None)
    for r in results:
        r["speedup_vs_padded"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3) if base else None
        r["memory_vs_padded"] = round(r["peak_memory_mib"] / base["peak_memory_mib"], 3) if base else None
    header = f"{'mode':<13} {'attention':<18} {'tokens/s':>10} {'s/step':>8} {'pad %':>6} {'peak MiB':>9} {'MFU':>7} {'speed-up':>8} {'mem x':>6}"
    print(f"device {results[0]['device']}")
    print(header)
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['mode']:<13} {r['attn_implementation']:<18} {r['tokens_per_second']:>10.1f} {r['seconds_per_step']:>8.3f} "
              f"{100 * r['pad_share']:>6.1f} {r['peak_memory_mib']:>9.0f} {mfu:>7} {r['speedup_vs_padded'] or 0:>8.2f} {r['memory_vs_padded'] or 0:>6.2f}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the generated model, rows and checkpoints
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "method": args.method, "batch": args.batch,
                                               "steps": args.steps, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
