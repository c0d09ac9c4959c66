"""The model card of a registered version: Markdown with YAML front matter naming data, config and scores."""

from __future__ import annotations

from typing import Any

from sft_pipeline.registry.tags import TAG_GATE_PASSED


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
) -> str:
    """The model card (Markdown with YAML front matter) naming data, config and scores."""
    import yaml

    front = {
        "library_name": "peft" if log_mode == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sft", "sft_pipeline", "lora" if log_mode == "adapter" else "merged"],
        "base_model": str(base_model_dir),
        "scores": {k: v for k, v in sorted(metrics.items())},
        "datasets_sha256": {split: info.get("sha256") for split, info in datasets.items()},
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {model_name}", ""]
    lines += [
        "Supervised fine-tune produced by `sft_pipeline` "
        f"({'PEFT adapter over a local base model' if log_mode == 'adapter' else 'adapter merged into the base weights'}).",
        "",
        f"- base model: `{base_model_dir}` (revision `{tags.get('base_model_revision', 'unknown')}`)",
        f"- model files sha256: `{model_sha256}`",
        f"- Dagster run: `{tags.get('dagster_run_id', 'n/a')}`",
        "",
        "## Data",
        "",
        "| split | rows | sha256 | path |",
        "|---|---|---|---|",
    ]
    for split, info in datasets.items():
        lines.append(f"| {split} | {info.get('rows', '')} | `{str(info.get('sha256', ''))[:16]}` | `{info.get('path', '')}` |")
    if not datasets:
        lines.append("| (not recorded) | | | |")
    lines += ["", "## Configuration", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | `{str(v)[:200]}` |" for k, v in sorted(params.items())]
    lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    gate = tags.get(TAG_GATE_PASSED)
    if gate is not None:
        lines += ["", "## Evaluation gate", "", f"- passed: **{gate}**", f"- {tags.get('gate_reasons', '')}"]
    versions = {k: v for k, v in tags.items() if k.startswith(("code_version.", "data_version."))}
    if versions:
        lines += ["", "## Lineage (Dagster)", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in sorted(versions.items())]
    lines += ["", "## Use", "", "```python", "import mlflow",
              f'model = mlflow.pyfunc.load_model("models:/{model_name}@champion")',
              'model.predict(["Give three tips for staying healthy."], params={"max_new_tokens": 64})', "```", ""]
    return "\n".join(lines)
