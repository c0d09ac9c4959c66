"""Demo-task benchmark: how well the demo's training settings learn the ticket-triage task, against a named baseline.

Each setting trains a LoRA on the tokenized rows of a finished demo (`artifacts/sft_dataset/...`, the same
train/validation split the pipeline trained on) from its base model, in its own process, with
`sft_pipeline.training.train`. Then the adapter answers every held-out ticket-triage row of the test split
by greedy generation (`evaluation.heldout.evaluate_generations`, as `model_evaluation` does), and the
answers are scored: exact match (both JSON fields right), field accuracy, valid JSON.

The baseline setting `before` is the demo's settings before this benchmark existed (40 steps at learning
rate 1e-3, validation every 20 steps, LoRA on every block, fp32); `default` is the package's defaults.
Printed per setting: training wall time (model load and validation included), tokens/s, precision, the
held-out scores with 95% Wilson intervals; then each setting against the baseline on the same rows
(exact McNemar test of exact match) and PASS/FAIL: `default` beats `before` significantly (p < 0.05).
Exits 1 when that fails.

    make demo                                          # once: the artifacts this reads
    .venv/bin/python bench/demo_task.py                # before vs default
    .venv/bin/python bench/demo_task.py --setting "lr3e-3:learning_rate=0.003" --setting "top6:lora_last_layers=6"
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

BASELINE = "before"
SETTINGS = {
    BASELINE: {"max_steps": 40, "learning_rate": 1e-3, "eval_steps": 20, "lora_last_layers": 0, "bf16": False},
    "default": {},
}
TASK_CATEGORY = "ticket_triage"


def _only_folder(parent: Path, what: str) -> Path:
    """The newest sub-folder of `parent` that holds `what` (a demo keeps one per fingerprint)."""
    found = sorted((p for p in parent.glob(f"*/{what}")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{parent}: no */{what}; run `make demo` first (or pass --artifacts)")
    return found[-1].parent


def demo_inputs(artifacts: Path) -> dict[str, Path]:
    """The base model folder, the tokenized dataset folder and the curated rows (for categories) of a finished demo."""
    return {"model": _only_folder(artifacts / "base_model", "config.json"),
            "dataset": _only_folder(artifacts / "sft_dataset", "train.parquet"),
            "rows": _only_folder(artifacts / "clean_instructions", "rows.parquet") / "rows.parquet"}


def parse_setting(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, overrides); values are read as JSON where they parse, else strings."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    if not name:
        raise ValueError(f"setting {text!r}: give it a name, as in 'name:key=value'")
    return name, overrides


def worker(args: argparse.Namespace) -> dict:
    """Train one setting and score its held-out ticket answers; returns the figures and the per-row exact matches."""
    import torch

    from sft_pipeline.evaluation.heldout import evaluate_generations, generation_rows, read_row_categories
    from sft_pipeline.modeling import load_model_for_eval
    from sft_pipeline.training import TrainingConfig, train

    torch.set_num_threads(args.threads or torch.get_num_threads())
    inputs = demo_inputs(Path(args.artifacts))
    overrides = json.loads(args.overrides)
    cfg = TrainingConfig(model_dir=str(inputs["model"]), dataset_dir=str(inputs["dataset"]), output_dir=args.out,
                         resume=False, **overrides)
    start = time.perf_counter()
    result = train(cfg)
    train_wall = time.perf_counter() - start
    categories = read_row_categories([inputs["rows"]])
    rows = generation_rows(inputs["dataset"] / "test.parquet", categories, 10**9)
    rows = rows[rows["category"] == TASK_CATEGORY].reset_index(drop=True)
    if rows.empty:
        raise RuntimeError(f"{inputs['dataset']}/test.parquet has no {TASK_CATEGORY} rows to score")
    model, tokenizer = load_model_for_eval(inputs["model"], result.adapter_dir)
    answers = evaluate_generations(model, tokenizer, rows, batch_size=32)
    return {
        "setting": args.name, "overrides": overrides, "train_wall_s": round(train_wall, 1),
        "tokens_per_second": result.tokens_per_second, "tokens": result.tokens_seen, "steps": result.global_step,
        "precision": result.precision, "lora_last_layers": cfg.lora_last_layers, "peak_memory_mib": result.peak_memory_mib,
        "n": len(answers), "ids": [str(i) for i in answers["id"]],
        "exact_match_rows": [float(v) for v in answers["exact_match"]],
        "exact_match": float(answers["exact_match"].mean()),
        "field_accuracy": float(answers["field_accuracy"].mean()), "valid": float(answers["valid"].mean()),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default=str(REPO / "artifacts"), help="a finished demo's artifacts folder")
    parser.add_argument("--setting", action="append", default=None,
                        help="'name:key=value,...' TrainingConfig overrides; repeatable (default: before, default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0

    from sft_pipeline.evaluation.statistics import mcnemar_exact, wilson_interval

    demo_inputs(Path(args.artifacts))  # fail before any training when the demo has not run
    settings = dict(SETTINGS)
    for text in args.setting or []:
        name, overrides = parse_setting(text)
        settings[name] = overrides
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_demo_task_") as tmp:
        for name, overrides in settings.items():
            result_path = Path(tmp) / f"{name}.json"
            command = [sys.executable, __file__, "--worker", "--artifacts", args.artifacts, "--name", name,
                       "--overrides", json.dumps(overrides), "--out", str(Path(tmp) / name),
                       "--result", str(result_path), "--threads", str(args.threads)]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0 or not result_path.is_file():
                print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            r = results[name] = json.loads(result_path.read_text())
            hits = round(r["exact_match"] * r["n"])
            low, high = wilson_interval(hits, r["n"])
            blocks = f"last {r['lora_last_layers']}" if r["lora_last_layers"] else "all"
            print(f"  {name:<10} {r['steps']:>4} steps  {r['train_wall_s']:>6.1f} s  {r['tokens_per_second']:>6.1f} tok/s  "
                  f"{r['precision']}  {blocks} blocks  exact match {r['exact_match']:.3f} "
                  f"[{low:.3f}, {high:.3f}]  fields {r['field_accuracy']:.3f}  valid {r['valid']:.2f}  n={r['n']}  "
                  f"load {r['load']}", flush=True)
    base = results[BASELINE]
    verdicts = []
    for name, r in results.items():
        if name == BASELINE:
            continue
        if r["ids"] != base["ids"]:
            raise RuntimeError(f"{name} and {BASELINE} answered different rows")
        test = mcnemar_exact([v == 1.0 for v in base["exact_match_rows"]], [v == 1.0 for v in r["exact_match_rows"]])
        r["vs_baseline"] = test
        print(f"  {name} vs {BASELINE}: exact match {r['exact_match'] - base['exact_match']:+.3f} "
              f"(95% CI [{test['delta_ci'][0]:+.3f}, {test['delta_ci'][1]:+.3f}]), McNemar p={test['p_value']:.2g}, "
              f"training time x{r['train_wall_s'] / base['train_wall_s']:.2f}")
        if name == "default":
            verdicts.append(test["delta"] > 0 and test["p_value"] < 0.05)
            print(f"  {'PASS' if verdicts[-1] else 'FAIL'}: default beats {BASELINE} significantly (p < 0.05)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
