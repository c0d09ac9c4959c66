"""The model card: plain Markdown (no YAML front matter, no setext headings) with the base-vs-tuned table, the gate's
numbers and reasons, and lineage as a list; fitted to MLflow's description limit; the gate's numbers as version tags."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pandas as pd
import pytest

from sft_pipeline.evaluation.answer_metrics import compare_task_metrics, score_generations
from sft_pipeline.evaluation.gate import GateSettings, evaluate_gate
from sft_pipeline.evaluation.statistics import compare_evaluations
from sft_pipeline.outputs import ModelEvaluationInfo
from sft_pipeline.registry.candidate import candidate_metrics, evaluation_report, gate_tags
from sft_pipeline.registry.card import DESCRIPTION_MAX_CHARS, card_front_matter, render_model_card, render_readme

TICKET = '{"queue": "billing", "urgency": "high"}'


def _evaluation_info(tuned_right: int = 36) -> ModelEvaluationInfo:
    """A model_evaluation hand-off from real comparisons: 40 ticket rows and 2 free-text rows, 40 MMLU questions."""
    refs, kinds = [TICKET] * 40 + ["The sea is wide."] * 2, ["structured"] * 40 + ["generative"] * 2
    ids = [f"r{i:03d}" for i in range(42)]
    base = score_generations(refs, ["Billing, high."] * 40 + ["The sea."] * 2, kinds)
    tuned = score_generations(refs, [TICKET] * tuned_right + ['{"queue": "refund", "urgency": "high"}'] * (40 - tuned_right)
                              + ["The sea is wide."] * 2, kinds)
    base.insert(0, "id", ids)
    tuned.insert(0, "id", ids)
    task = compare_task_metrics(base, tuned)
    questions = [f"q{i}" for i in range(40)]
    base_pred = pd.DataFrame({"question_id": questions, "correct": [True] * 12 + [False] * 28})
    tuned_pred = pd.DataFrame({"question_id": questions, "correct": [True] * 13 + [False] * 27})
    base_summary, tuned_summary = ({"accuracy": float(p["correct"].mean()), "accuracy_ci": [0.1, 0.5]} for p in (base_pred, tuned_pred))
    comparison = compare_evaluations(base_summary, tuned_summary, base_pred, tuned_pred)
    test = {"loss": 1.0, "num_rows": 42, "num_tokens": 900}
    tuned_summary["test"] = {**test, "loss": 0.4}
    tuned_summary["task"], base_summary["task"] = task["tuned"], task["base"]
    gate = evaluate_gate(comparison, test, tuned_summary["test"], GateSettings(), task)
    return ModelEvaluationInfo(path="/nowhere", digest="d" * 64, files=(), tuned=tuned_summary, base={**base_summary, "test": test},
                               comparison=comparison, gate=gate, task=task, settings={}, mlflow_run_id="eval-run")


def _card(evaluation: ModelEvaluationInfo, params: dict | None = None, max_chars: int | None = None) -> str:
    tags = {"base_model_revision": "rev-1", "dagster_run_id": "run-1", "training_run_id": "train-run", "gate_passed": "True",
            "data_version.sft_dataset": "a" * 64, "code_version.registered_model": "3"}
    datasets = {"train": {"rows": 400, "sha256": "b" * 64, "path": "/data/train.parquet"},
                "test": {"rows": 110, "sha256": "c" * 64, "path": "/data/test.parquet"}}
    return render_model_card("sft_pipeline_model", log_mode="adapter", base_model_dir="/models/SmolLM2-135M-Instruct",
                             metrics={"mmlu_accuracy": 0.325, "task_exact_match": 0.9}, params=params or {"method": "lora"},
                             tags=tags, datasets=datasets, model_sha256="e" * 64, evaluation=evaluation_report(evaluation),
                             max_chars=max_chars)


def _setext_or_front_matter(text: str) -> list[str]:
    """Lines Markdown would turn into a heading by the line under them (=== or ---), and front-matter fences."""
    lines = text.splitlines()
    bad = [line for line in lines if re.fullmatch(r"\s*(-{3,}|={3,})\s*", line)]
    return bad + [line for prev, line in zip(lines, lines[1:]) if prev.strip() and re.fullmatch(r"\s*[-=]+\s*", line)]


def test_card_is_plain_markdown_with_the_table_the_gate_and_lineage():
    card = _card(_evaluation_info())
    assert card.startswith("# sft_pipeline_model\n\nSupervised fine-tune of `SmolLM2-135M-Instruct` produced by `sft_pipeline` "
                           "(LoRA adapter over a local base model). Gate passed: held-out exact_match 0.000 -> 0.900, effect +0.900 (95% CI [")
    assert _setext_or_front_matter(card) == [] and "library_name" not in card
    headings = [line for line in card.splitlines() if line.startswith("#")]
    assert headings == ["# sft_pipeline_model", "## Evaluation", "## Gate", "## Lineage", "## Data", "## Use", "## Scores",
                        "## Configuration"]
    table = card.split("## Evaluation", 1)[1].split("## Gate", 1)[0]
    assert "| metric | n | base [95% CI] | tuned [95% CI] | tuned - base [95% CI] | p (two-sided) |" in table
    assert "| **exact match** (primary) | 40 | 0.000 [0.000, 0.088] | 0.900 [" in table
    assert "| field accuracy | 40 |" in table and "| valid JSON | 40 | 0.000" in table and "| MMLU accuracy | 40 | 0.300 [" in table
    gate = card.split("## Gate", 1)[1].split("## Lineage", 1)[0]
    assert "**Gate: passed** (alpha 0.05)" in gate and "McNemar exact p=" in gate and "one-sided McNemar p=" in gate
    lineage = card.split("## Lineage", 1)[1].split("## Data", 1)[0]
    assert "- base model: `/models/SmolLM2-135M-Instruct` (revision `rev-1`)" in lineage
    assert f"- data_version.sft_dataset: `{'a' * 64}`" in lineage and "- training run: `train-run`" in lineage
    assert "- train: 400 rows, sha256 `bbbbbbbbbbbbbbbb`, `/data/train.parquet`" in card


def test_a_failed_gate_shows_every_reason():
    card = _card(_evaluation_info(tuned_right=0))
    assert "Gate failed" in card and "**Gate: failed**" in card
    reasons = card.split("Reasons:", 1)[1].split("## Lineage", 1)[0]
    assert "- held-out exact_match did not improve: base 0.000 -> tuned 0.000" in reasons


def test_the_description_fits_mlflows_limit_by_leaving_out_optional_sections():
    evaluation = _evaluation_info()
    full = _card(evaluation, params={f"param_{i}": "x" * 150 for i in range(40)})
    assert len(full) > DESCRIPTION_MAX_CHARS
    description = _card(evaluation, params={f"param_{i}": "x" * 150 for i in range(40)}, max_chars=DESCRIPTION_MAX_CHARS)
    assert len(description) <= DESCRIPTION_MAX_CHARS
    assert "## Configuration" not in description and "## Evaluation" in description and "## Gate" in description
    assert "## Lineage" in description and description.endswith("\n")
    # Short cards are not touched.
    assert _card(evaluation, max_chars=DESCRIPTION_MAX_CHARS) == _card(evaluation)
    tiny = _card(evaluation, max_chars=600)
    assert len(tiny) <= 600 and tiny.endswith("the full card is the version's model_card.md artifact)_\n")


def test_readme_front_matter_is_kept_apart_from_the_card():
    import yaml
    from huggingface_hub import ModelCard

    card = _card(_evaluation_info())
    front = card_front_matter(log_mode="adapter", base_model_dir="/models/base", metrics={"mmlu_accuracy": 0.3},
                              datasets={"test": {"sha256": "c" * 64}})
    readme = render_readme(card, front)
    assert readme.startswith("---\nlibrary_name: peft\n")
    assert yaml.safe_load(readme.split("---\n")[1])["datasets_sha256"] == {"test": "c" * 64}
    parsed = ModelCard(readme)
    assert parsed.data.to_dict()["base_model"] == "/models/base" and parsed.text.strip() == card.strip()


def test_gate_tags_and_candidate_metrics():
    evaluation = _evaluation_info()
    tags = gate_tags(evaluation.gate)
    task = evaluation.gate["task"]
    assert tags["gate.passed"] == "True" and tags["gate.primary_metric"] == "exact_match" and tags["gate.alpha"] == "0.05"
    assert tags["gate.test"] == "McNemar exact" and tags["gate.n"] == "40"
    assert float(tags["gate.effect"]) == pytest.approx(0.9) and float(tags["gate.p_value"]) == pytest.approx(task["p_value"], rel=1e-5)
    assert tags["gate.effect_ci"] == f"[{task['effect_ci'][0]:.6g}, {task['effect_ci'][1]:.6g}]"
    assert float(tags["gate.mmlu_delta"]) == pytest.approx(0.025) and float(tags["gate.mmlu_p_value"]) == 1.0  # one newly right, none newly wrong
    assert gate_tags({"passed": False, "reasons": ["x"]}) == {"gate.passed": "False"}
    metrics = candidate_metrics(SimpleNamespace(train_loss=1.5), evaluation)
    assert metrics["task_exact_match"] == 0.9 and metrics["task_exact_match_base"] == 0.0 and metrics["task_valid"] == 1.0
    assert metrics["test_loss"] == 0.4 and "task_rows" not in metrics and "task_rouge_l" in metrics


def test_registered_version_carries_the_card_and_the_gate_tags(trained, tiny_model_dir, store, tmp_path):
    """register_candidate end to end: the version's description is the plain card, its tags hold the gate's numbers,
    and the logged model keeps the Hugging Face front matter apart (model_card_data.yaml)."""
    from mlflow import MlflowClient

    from sft_pipeline.registry.candidate import RegistrySettings, register_candidate
    from sft_pipeline.tracking import use_tracking_uri
    from tests.unit.registry.helpers import split_files

    uri, _ = store
    evaluation = _evaluation_info()
    training = SimpleNamespace(weights_dir=trained.adapter_dir, method="lora", global_step=2, train_loss=trained.train_loss,
                               mlflow_run_id=None)
    base_model = SimpleNamespace(path=str(tiny_model_dir), source="tiny", revision="tiny-rev")
    dataset = SimpleNamespace(files={k: str(v) for k, v in split_files(trained).items()})
    info = register_candidate(training, evaluation, base_model, dataset, RegistrySettings(tracking_uri=uri, model_name="tiny-card"),
                              tags={"dagster_run_id": "run-card"}, run_name="register-card")
    assert info.created and info.promotion["promoted"] is True
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("tiny-card", str(info.version))
    assert mv.tags["gate.passed"] == "True" and mv.tags["gate.primary_metric"] == "exact_match"
    assert float(mv.tags["gate.p_value"]) < 1e-9 and float(mv.tags["gate.effect"]) == pytest.approx(0.9)
    assert float(mv.tags["score.task_exact_match"]) == pytest.approx(0.9)
    description = mv.description
    assert description.startswith("# tiny-card\n\n") and _setext_or_front_matter(description) == []
    assert "| **exact match** (primary) | 40 |" in description and "**Gate: passed**" in description
    assert "## Lineage" in description and "- evaluation run: `eval-run`" in description and len(description) <= DESCRIPTION_MAX_CHARS
    with use_tracking_uri(uri) as mlflow:
        local = mlflow.artifacts.download_artifacts(f"models:/tiny-card/{info.version}", dst_path=str(tmp_path / "dl"))
    from pathlib import Path

    card_file = next(Path(local).rglob("model_card.md")).read_text()
    assert card_file.lstrip().startswith("# tiny-card") and "| **exact match** (primary) |" in card_file
    assert "library_name: peft" in next(Path(local).rglob("model_card_data.yaml")).read_text()
