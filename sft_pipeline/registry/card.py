"""The model card of a registered version, in plain Markdown: a title, a short summary, the base-vs-tuned
table with 95% intervals, the gate verdict with its numbers and reasons, lineage and data as lists, how to
load it, and (in the full card) every score and parameter.

The version's description in MLflow is this card without YAML front matter (the MLflow UI shows front
matter as text, and its closing `---` turns the line above it into a heading). `render_readme` puts the
Hugging Face front matter on top only for the `huggingface_hub.ModelCard` logged with the model, which
MLflow splits into the model's `model_card.md` (the card) and `model_card_data.yaml` (the front matter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sft_pipeline.evaluation.report import comparison_markdown, gate_markdown, gate_summary
from sft_pipeline.registry.tags import TAG_GATE_PASSED

# MLflow stores a version description in at most 5,000 characters.
DESCRIPTION_MAX_CHARS = 4900
# Sections left out, in this order, when the card must fit in a description.
OPTIONAL_SECTIONS = ("Configuration", "Scores", "Data", "Use")


def _cell(value: Any, limit: int = 200) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")[:limit]


def _sections(model_name: str, *, log_mode: str, base_model_dir: str, metrics: Mapping[str, float], params: Mapping[str, Any],
              tags: Mapping[str, str], datasets: Mapping[str, Mapping[str, Any]], model_sha256: str,
              evaluation: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    evaluation = evaluation or {}
    gate = evaluation.get("gate")
    kind = "LoRA adapter over a local base model" if log_mode == "adapter" else "adapter merged into the base weights"
    summary = f"Supervised fine-tune of `{Path(str(base_model_dir)).name}` produced by `sft_pipeline` ({kind})."
    if gate:
        summary += " " + gate_summary(gate)
    elif tags.get(TAG_GATE_PASSED) is not None:
        summary += f" Gate {'passed' if tags[TAG_GATE_PASSED] == 'True' else 'failed'}."
    sections = [("", f"# {model_name}\n\n{summary}")]
    if evaluation.get("rows"):
        sections.append(("Evaluation", "Held-out test split and MMLU, base model vs fine-tuned model, paired over the "
                         "same rows and questions (95% intervals; differences by paired bootstrap).\n\n"
                         + comparison_markdown(list(evaluation["rows"]))))
    if gate:
        sections.append(("Gate", gate_markdown(gate)))
    elif tags.get(TAG_GATE_PASSED) is not None:
        sections.append(("Gate", f"**Gate: {'passed' if tags[TAG_GATE_PASSED] == 'True' else 'failed'}**\n\n"
                         f"- {tags.get('gate_reasons', '')}"))
    lineage = [f"- base model: `{base_model_dir}` (revision `{tags.get('base_model_revision', 'unknown')}`)",
               f"- model files sha256: `{model_sha256}`"]
    for key, label in (("training_run_id", "training run"), ("evaluation_run_id", "evaluation run"),
                       ("dagster_run_id", "Dagster run"), ("dagster_run_url", "Dagster run URL")):
        if tags.get(key):
            lineage.append(f"- {label}: `{tags[key]}`")
    lineage += [f"- {k}: `{v}`" for k, v in sorted(tags.items()) if k.startswith(("code_version.", "data_version."))]
    sections.append(("Lineage", "\n".join(lineage)))
    data = [f"- {split}: {info.get('rows', '?')} rows, sha256 `{str(info.get('sha256', ''))[:16]}`, `{info.get('path', '')}`"
            for split, info in datasets.items()] or ["- (not recorded)"]
    sections.append(("Data", "\n".join(data)))
    sections.append(("Use", "\n".join([
        "```python", "import mlflow", f'model = mlflow.pyfunc.load_model("models:/{model_name}@champion")',
        'model.predict({"messages": [{"role": "user", "content": "Give three tips for staying healthy."}], "max_tokens": 64})', "```"])))
    scores = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    sections.append(("Scores", "\n".join(scores)))
    config = ["| parameter | value |", "|---|---|"] + [f"| {k} | `{_cell(v)}` |" for k, v in sorted(params.items())]
    sections.append(("Configuration", "\n".join(config)))
    return sections


def _join(sections: list[tuple[str, str]]) -> str:
    return "\n\n".join(body if not title else f"## {title}\n\n{body}" for title, body in sections) + "\n"


def render_model_card(
    model_name: str,
    *,
    log_mode: str,
    base_model_dir: str,
    metrics: dict[str, float],
    params: dict[str, Any],
    tags: dict[str, str],
    datasets: dict[str, dict[str, Any]],
    model_sha256: str,
    evaluation: Mapping[str, Any] | None = None,
    max_chars: int | None = None,
) -> str:
    """The model card as plain Markdown (no front matter).

    `evaluation`: {"rows": `evaluation.report.comparison_rows`, "gate": the gate verdict with its numbers}
    (`registry.candidate.evaluation_report` builds it from the evaluation hand-off). `max_chars`: leave out
    the optional sections (`OPTIONAL_SECTIONS`, in order) until the card fits; cut it only as a last resort.
    """
    sections = _sections(model_name, log_mode=log_mode, base_model_dir=base_model_dir, metrics=metrics, params=params,
                         tags=tags, datasets=datasets, model_sha256=model_sha256, evaluation=evaluation)
    text = _join(sections)
    if max_chars is None:
        return text
    for title in OPTIONAL_SECTIONS:
        if len(text) <= max_chars:
            break
        sections = [s for s in sections if s[0] != title]
        text = _join(sections)
    if len(text) > max_chars:
        note = "\n\n_(cut to fit; the full card is the version's model_card.md artifact)_\n"
        text = text[: max_chars - len(note)].rsplit("\n", 1)[0] + note
    return text


def card_front_matter(*, log_mode: str, base_model_dir: str, metrics: Mapping[str, float],
                      datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Hugging Face model-card metadata: library, task, tags, base model, scores and dataset hashes."""
    return {
        "library_name": "peft" if log_mode == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sft", "sft_pipeline", "lora" if log_mode == "adapter" else "merged"],
        "base_model": str(base_model_dir),
        "scores": {k: v for k, v in sorted(metrics.items())},
        "datasets_sha256": {split: info.get("sha256") for split, info in datasets.items()},
    }


def render_readme(card_text: str, front_matter: Mapping[str, Any]) -> str:
    """A Hugging Face README.md: YAML front matter, then the card (what `log.log_model` hands to `ModelCard`)."""
    import yaml

    return "---\n" + yaml.safe_dump(dict(front_matter), sort_keys=False).strip() + "\n---\n\n" + card_text
