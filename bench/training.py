"""Training benchmark: this package's default batching against a plain TRL SFTTrainer with padded batches.

Every mode trains the same LoRA on the same tokenized rows with the same optimizer settings, one
epoch (so every mode trains every row exactly once), each in its own process so its memory is
measured cleanly:

* `trl_padded` (the baseline): a plain TRL `SFTTrainer` built here, not by this package: random
  batches padded to their longest row, SDPA attention, TRL's own LM-head loss, glibc's default heap.
* `default`: `sft_pipeline.training.build_trainer` with the default `batching: auto` (on a CPU:
  length-grouped padded batches, each run as row groups of at most `max_batch_tokens` tokens),
  the labeled-positions-only LM head and the lean heap.
* optionally `padded`, `length_grouped`, `padding_free`, `packed`: `build_trainer` in that mode.

The rows are those of the demo: the packaged ticket-triage set (80 % of it, the share the
tokenization stage trains on; short prompts, a ~12-token JSON answer) plus the 168 general seed
conversations, tokenized by the pipeline's own encoder (chat template, labels on the answers only).
The model is the demo's base model (SmolLM2-135M-Instruct, resolved from the packaged GGUF file)
unless `--model` names another folder (`--model tiny`: a tiny random Llama, for a smoke run).

Reported per mode: non-pad tokens trained per second over the epoch, seconds per step, the share
of pad tokens the model processed, the peak RSS of the process (CUDA: max allocated), the peak of
each step and its growth (the largest step peak of the second half of the epoch minus that of
steps 2 .. half), and the load average of the machine before and after (a busy machine slows
every mode). Then PASS/FAIL against the goals of issue #15: default >= 1.2x the baseline's
tokens/s, peak RSS <= 3 GiB, no growth across steps (within --flat-tolerance MiB).

    .venv/bin/python bench/training.py                       # SmolLM2-135M, CPU, baseline vs default
    .venv/bin/python bench/training.py --rows 160 --json bench.json
    .venv/bin/python bench/training.py --model tiny --modes trl_padded,default,padding_free
    .venv/bin/python bench/training.py --bf16 off --lora-last-layers 0   # fp32, LoRA on every block
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("trl_padded", "default", "padded", "length_grouped", "padding_free", "packed")
BASELINE = "trl_padded"
GOAL_SPEEDUP = 1.2
GOAL_PEAK_MIB = 3 * 1024
TRIAGE_TRAIN_SHARE = 0.8


def demo_conversations(seed: int = 0) -> list[list[dict[str, str]]]:
    """The demo's training conversations: 80 % of the ticket-triage set and every general seed conversation."""
    data = REPO / "sft_pipeline" / "data"
    lines = lambda name: [json.loads(x) for x in (data / name).read_text().splitlines() if x.strip()]  # noqa: E731

    def alpaca(r):
        prompt = (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]

    triage = [alpaca(r) for r in lines("ticket_triage.jsonl")]
    random.Random(seed).shuffle(triage)
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    general = [alpaca(r) for r in lines("seed_alpaca.jsonl")]
    general += [[{"role": roles[m["from"]], "content": m["value"]} for m in r["conversations"]]
                for r in lines("seed_sharegpt.jsonl")]
    return triage[: round(TRIAGE_TRAIN_SHARE * len(triage))] + general


def build_rows(model_dir: str, out_dir: Path, n_rows: int, max_length: int, seed: int = 0) -> Path:
    """Tokenize the demo's conversations with the pipeline's encoder into out_dir/train.parquet.

    `n_rows` > 0 takes a random sample of that many (keeping the mix of task and general rows);
    rows longer than `max_length` are dropped, as the tokenization stage does by default.
    """
    import pandas as pd
    from transformers import AutoTokenizer

    from sft_pipeline.tokenization.encode import tokenize_conversation

    tok = AutoTokenizer.from_pretrained(model_dir)
    conversations = demo_conversations(seed)
    if 0 < n_rows < len(conversations):
        conversations = random.Random(seed).sample(conversations, n_rows)
    rows = []
    for messages in conversations:
        r = tokenize_conversation(messages, tok)
        if len(r["input_ids"]) <= max_length and any(x != -100 for x in r["labels"]):
            rows.append({**{k: r[k] for k in ("input_ids", "attention_mask", "labels")}, "length": len(r["input_ids"])})
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out_dir / "train.parquet", index=False)
    return out_dir


def resolve_model(name: str | None, cache: Path) -> str:
    """A local HF folder: the demo's base model (default), a tiny random model ('tiny') or the given folder."""
    if name == "tiny":
        from tests.tiny_model import build_tiny_model

        return str(build_tiny_model(cache / "tiny_model"))
    if name:
        return name
    from sft_pipeline.model_resolution import default_base_model_source, resolve_base_model

    return resolve_base_model(default_base_model_source(), cache).path


def _config(args: argparse.Namespace, mode: str):
    from sft_pipeline.training import TrainingConfig

    return TrainingConfig(
        model_dir=args.model, dataset_dir=args.data, output_dir=args.out, method=args.method,
        batching="auto" if mode in ("default", BASELINE) else mode, packing_length=args.packing_length,
        max_steps=args.steps, per_device_train_batch_size=1 if mode == "packed" else args.batch,
        save_steps=10**6, save_total_limit=1, eval_steps=10**6, early_stopping_patience=0,
        load_best_model_at_end=False, resume=False, seed=0, gradient_checkpointing=args.gradient_checkpointing,
        use_liger_kernel=args.liger and mode != BASELINE, launcher="python",
        # Precision and adapted blocks are the model's setup, not batching: every mode, the baseline included, gets the same.
        bf16={"auto": None, "on": True, "off": False}[args.bf16],
        **({} if args.lora_last_layers is None else {"lora_last_layers": args.lora_last_layers}),
    )


def count_tokens(trainer) -> dict[str, int]:
    """Wrap the trainer's collator to count real tokens and every token the model processes (pads included,
    row groups cut as the trainer cuts them); returns the live counts."""
    from sft_pipeline.training.batching import split_padded_batch

    collate = trainer.data_collator
    counts = {"real": 0, "processed": 0}

    def counting_collator(examples):
        batch = collate(examples)
        budget = getattr(trainer, "max_batch_tokens", 0)
        groups = (split_padded_batch(batch, budget) if budget else None) or [batch]
        counts["processed"] += sum(int(g["input_ids"].numel()) for g in groups)
        counts["real"] += sum(len(e["input_ids"]) for e in examples)
        return batch

    trainer.data_collator = counting_collator
    return counts


def plain_trl_trainer(cfg, callbacks):
    """The baseline: TRL's SFTTrainer as a user would set it up, same model, rows and optimizer settings."""
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from sft_pipeline.training import load_model, load_tokenized_splits
    from sft_pipeline.training.device import resolve_bf16, uses_cpu
    from sft_pipeline.training.trainer import _checkpointing_args

    set_seed(cfg.seed)
    bf16 = resolve_bf16(cfg)  # the same precision as build_trainer
    splits = load_tokenized_splits(cfg.dataset_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = SFTConfig(
        output_dir=cfg.output_dir, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        max_length=None, packing=False, padding_free=False, include_num_input_tokens_seen="non_padding",
        disable_tqdm=True, dataloader_num_workers=0, bf16=bf16, fp16=False,
        use_cpu=uses_cpu(cfg),  # transformers refuses bf16 without a GPU unless told the CPU is meant
        **_checkpointing_args(SFTConfig, cfg.gradient_checkpointing),
    )
    return SFTTrainer(model=load_model(cfg, bf16), args=args, train_dataset=splits["train"],
                      processing_class=tokenizer, callbacks=callbacks)


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (a busy machine slows wall time, not this much)."""
    t = os.times()
    return t.user + t.system


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process: train one epoch (args.steps steps), time it, measure memory per step."""
    import torch
    from transformers import TrainerCallback

    from sft_pipeline.training import build_trainer, count_parameters, model_flops_utilization
    from sft_pipeline.training.performance import MEMORY, current_rss_mib, step_peak_growth_mib

    cfg = _config(args, args.mode)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.cpu0 = None
            self.steps = []  # (step, end time, non-pad tokens seen, step peak MiB, RSS after the step MiB)

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.t0, self.cpu0 = time.perf_counter(), _cpu_seconds()
            MEMORY.begin()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen),
                               MEMORY.interval_peak_mib(), current_rss_mib()))
            self.cpu1 = _cpu_seconds()

    timer = Timer()
    if args.mode == BASELINE:
        trainer = plain_trl_trainer(cfg, [timer])
    else:
        trainer, _, _ = build_trainer(cfg, callbacks=[timer])
    counts = count_tokens(trainer)
    trainable, total = count_parameters(trainer.model)
    load_before = os.getloadavg()
    trainer.train()
    load_after = os.getloadavg()
    last_step, t_end, tokens, _, _ = timer.steps[-1]
    wall = t_end - timer.t0
    cpu = timer.cpu1 - timer.cpu0
    tps = tokens / wall
    peaks = [p for _, _, _, p, _ in timer.steps]
    growth = step_peak_growth_mib(peaks) if all(p is not None for p in peaks) else None
    after = [r for _, _, _, _, r in timer.steps]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "mode": args.mode,
        "attn_implementation": trainer.model.config._attn_implementation,
        "batching": "TRL padded, random order" if args.mode == BASELINE else getattr(trainer.args, "train_sampling_strategy", ""),
        "max_batch_tokens": getattr(trainer, "max_batch_tokens", 0),
        "lora_dropout": cfg.lora_dropout,
        "lora_last_layers": cfg.lora_last_layers,
        "bf16": bool(trainer.args.bf16),
        "tokens_per_second": round(tps, 1),
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "tokens_per_cpu_second": round(tokens / cpu, 2),
        "seconds_per_step": round(wall / last_step, 3),
        "pad_share": round(1 - counts["real"] / max(counts["processed"], 1), 4),
        "peak_memory_mib": MEMORY.process_peak_mib(),
        "step_peaks_mib": peaks,
        "step_peak_growth_mib": growth,
        "rss_after_step_mib": after,
        "rss_after_step_growth_mib": step_peak_growth_mib(after) if all(r is not None for r in after) else None,
        "mfu": model_flops_utilization(tps, total, trainable, cfg.gradient_checkpointing, 1, None, device)
        if device != "cpu" else None,
        "device": device,
        "steps": last_step,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


def verdict(results: list[dict], flat_tolerance: float) -> list[tuple[str, bool, str]]:
    """(goal, passed, figures) for the default mode against the baseline."""
    by = {r["mode"]: r for r in results}
    ours, base = by.get("default"), by.get(BASELINE)
    if ours is None:
        return []
    goals = []
    if base is not None:
        speedup = ours["tokens_per_second"] / base["tokens_per_second"]
        goals.append((f"tokens/s >= {GOAL_SPEEDUP}x {BASELINE}", speedup >= GOAL_SPEEDUP,
                      f"{ours['tokens_per_second']:.1f} vs {base['tokens_per_second']:.1f} tokens/s = {speedup:.3f}x "
                      f"(per CPU-second: {ours['tokens_per_cpu_second'] / base['tokens_per_cpu_second']:.3f}x)"))
    if ours["device"] == "cpu":
        goals.append((f"peak RSS <= {GOAL_PEAK_MIB} MiB", ours["peak_memory_mib"] <= GOAL_PEAK_MIB,
                      f"{ours['peak_memory_mib']:.0f} MiB"))
    growth = ours["step_peak_growth_mib"]
    goals.append((f"step peaks flat (growth <= {flat_tolerance:g} MiB)", growth is not None and growth <= flat_tolerance,
                  f"second half {max(ours['step_peaks_mib'][len(ours['step_peaks_mib']) // 2:]):.0f} MiB, "
                  f"growth {growth} MiB" if growth is not None else "not measurable here"))
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="HF model folder; default: the demo's base model (SmolLM2-135M-Instruct from the packaged "
                             "GGUF); 'tiny': a tiny random Llama built on the spot")
    parser.add_argument("--data", default=None, help="folder with train.parquet (default: the demo's rows, tokenized)")
    parser.add_argument("--modes", default=f"{BASELINE},default",
                        help=f"comma-separated, from {MODES}; '{BASELINE}' is the baseline")
    parser.add_argument("--method", default="lora", choices=("lora", "full", "freeze", "qlora"))
    parser.add_argument("--batch", type=int, default=8, help="rows per step (the demo's per_device_train_batch_size)")
    parser.add_argument("--rows", type=int, default=0, help="train on a random sample of this many rows (0: all)")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (default: one epoch over the rows)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--packing-length", type=int, default=None,
                        help="packed mode: tokens per packed row, one row per micro-batch (default: --batch x the mean "
                             "row length, so every mode trains about the same tokens per step)")
    parser.add_argument("--flat-tolerance", type=float, default=64.0,
                        help="MiB the step peaks of the second half may exceed those of the first (default 64)")
    parser.add_argument("--cache", default=str(REPO / "artifacts" / "bench_training"),
                        help="where the resolved base model is kept between runs")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="precision of every mode: auto = the package default (bf16 where the device multiplies it "
                             "natively), off = fp32")
    parser.add_argument("--lora-last-layers", type=int, default=None,
                        help="LoRA on the last N blocks in every mode (0: every block; default: the package default)")
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

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
    tmp = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    args.model = resolve_model(args.model, Path(args.cache))
    if args.data is None:
        args.data = str(build_rows(args.model, tmp / "data", args.rows, args.max_length))
    import pyarrow.parquet as pq

    lengths = [len(x) for x in pq.read_table(Path(args.data) / "train.parquet", columns=["input_ids"]).column(0).to_pylist()]
    if args.steps is None:
        args.steps = math.ceil(len(lengths) / args.batch)
    if args.packing_length is None:
        args.packing_length = int(-(-args.batch * (sum(lengths) / len(lengths)) // 64) * 64)
    print(f"model {args.model}  method {args.method}  rows {len(lengths)} (mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)} tokens)  batch {args.batch}  steps {args.steps}  cpus {os.cpu_count()}", flush=True)
    results = []
    for mode in modes:
        command = [sys.executable, __file__, "--worker", "--mode", mode, "--out", str(tmp / f"out_{mode}"),
                   "--model", args.model, "--data", args.data, "--method", args.method, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--packing-length", str(args.packing_length)]
        command += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--liger"] * args.liger
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{mode}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"  {mode}: {r['tokens_per_second']:.1f} tokens/s, peak {r['peak_memory_mib']:.0f} MiB, "
              f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, load {r['load_before'][0]:.1f} -> "
              f"{r['load_after'][0]:.1f}", flush=True)

    base = next((r for r in results if r["mode"] == BASELINE), None)
    for r in results:
        r["speedup"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3) if base else None
        r["cpu_speedup"] = round(r["tokens_per_cpu_second"] / base["tokens_per_cpu_second"], 3) if base else None
        r["memory_ratio"] = round(r["peak_memory_mib"] / base["peak_memory_mib"], 3) if base else None
    print(f"device {results[0]['device']}; tokens/s: non-pad tokens trained per second of wall time over the whole "
          f"epoch; tok/CPU-s: per second of the process's CPU time (less sensitive to other load); step peak: "
          f"the RSS high-water mark of each step; after: the RSS between steps; growth: second half over first")
    print(f"{'mode':<15} {'tokens/s':>9} {'tok/CPU-s':>9} {'s/step':>7} {'pad %':>6} {'peak MiB':>9} {'step peak MiB':>14} "
          f"{'growth':>6} {'after MiB':>11} {'growth':>6} {'speed-up':>8} {'CPU x':>6} {'mem x':>6} {'load 1m':>11}")

    def span(values):
        values = [v for v in values if v is not None]
        return f"{min(values):.0f}-{max(values):.0f}" if values else "-"

    def num(value):
        return f"{value:.0f}" if value is not None else "-"

    for r in results:
        print(f"{r['mode']:<15} {r['tokens_per_second']:>9.1f} {r['tokens_per_cpu_second']:>9.1f} "
              f"{r['seconds_per_step']:>7.2f} {100 * r['pad_share']:>6.1f} {r['peak_memory_mib']:>9.0f} "
              f"{span(r['step_peaks_mib']):>14} {num(r['step_peak_growth_mib']):>6} {span(r['rss_after_step_mib']):>11} "
              f"{num(r['rss_after_step_growth_mib']):>6} {r['speedup'] or 0:>8.2f} {r['cpu_speedup'] or 0:>6.2f} "
              f"{r['memory_ratio'] or 0:>6.2f} {r['load_before'][0]:>5.1f}->{r['load_after'][0]:<4.1f}")
        if r["mfu"] is not None:
            print(f"{'':<15} MFU {r['mfu']:.1%}")
    goals = verdict(results, args.flat_tolerance)
    for goal, passed, figures in goals:
        print(f"{'PASS' if passed else 'FAIL'}  {goal}: {figures}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the generated rows and checkpoints
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "method": args.method, "batch": args.batch,
                                               "steps": args.steps, "rows": len(lengths), "results": results,
                                               "goals": [{"goal": g, "passed": p, "figures": f} for g, p, f in goals]},
                                              indent=2))
    return 0 if all(p for _, p, _ in goals) else 2


if __name__ == "__main__":
    sys.exit(main())
