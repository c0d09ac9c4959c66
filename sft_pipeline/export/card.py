"""The model card (`README.md`) of the merged folder: what it is, its evaluation, its lineage, how it was verified.

The evaluation table and the gate come from the registered version's description (the registry's card,
`registry.card.render_model_card`), the lineage from the version's tags: the Dagster run, the MLflow
registration, training and evaluation runs, and the data and code versions it was made from.
"""

from __future__ import annotations

from typing import Any, Mapping

from sft_pipeline.export.champion import ChampionVersion


def _demote_headings(markdown: str, levels: int = 1) -> str:
    """Every Markdown heading one level deeper (outside code fences), so a card nests under a section."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _front_matter(champion: ChampionVersion, base_model: str) -> str:
    import yaml

    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": base_model,
        "tags": ["sft", "sft_pipeline", "merged", "lora"],
        "model_name": f"{champion.model_name} v{champion.version}",
    }
    return "---\n" + yaml.safe_dump(front, sort_keys=False).strip() + "\n---\n"


def _value(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _figures_table(exports: Mapping[str, Mapping[str, Any]]) -> str:
    rows = ["| export | status | identical answers | token agreement | required |", "|---|---|---|---|---|"]
    for name, entry in exports.items():
        figures = entry.get("figures") or {}
        if entry.get("status") != "verified":
            rows.append(f"| {name} | {entry.get('status', 'skipped')}: {_value(entry.get('reason', ''))} | | | |")
            continue
        agreement = figures.get("token_agreement", figures.get("leading_token_share"))
        rows.append(f"| {name} | verified | {figures.get('identical_answers')}/{figures.get('prompts')} | "
                    f"{agreement:.4f} | {_value(figures.get('required', ''))} |")
    return "\n".join(rows)


def render_export_card(champion: ChampionVersion, *, base_model: str, exports: Mapping[str, Mapping[str, Any]],
                       prompts: Mapping[str, Any]) -> str:
    """The merged folder's README.md."""
    lineage = champion.lineage()
    lines = [
        _front_matter(champion, base_model),
        f"# {champion.model_name} v{champion.version} (merged)",
        "",
        f"The `{champion.alias}` of the MLflow registered model `{champion.model_name}`, version {champion.version}: "
        "its LoRA adapter merged into the base model, saved as a standard Hugging Face folder "
        "(`AutoModelForCausalLM.from_pretrained(<this folder>)`, `vllm serve <this folder>`).",
        "",
        f"- base model: `{base_model}`",
        f"- registered model: `{champion.model_uri}` (files sha256 `{champion.model_sha256}`)",
        "",
        "## Lineage",
        "",
        f"- MLflow registration run: `{champion.run_id}`",
    ]
    for key, label in (("training_run_id", "MLflow training run"), ("evaluation_run_id", "MLflow evaluation run"),
                       ("dagster_run_id", "Dagster run"), ("dagster_run_url", "Dagster run URL"),
                       ("base_model_source", "base model source"), ("base_model_revision", "base model revision")):
        if lineage.get(key):
            lines.append(f"- {label}: `{lineage[key]}`")
    for group, label in (("data_version", "Dagster data version"), ("code_version", "Dagster code version"),
                         ("dataset_sha256", "dataset sha256")):
        for name, value in (lineage.get(group) or {}).items():
            lines.append(f"- {label} of `{name}`: `{value}`")
    scores = lineage.get("score") or {}
    if scores:
        lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_value(value)} |" for name, value in scores.items()]
    lines += [
        "",
        "## Verification",
        "",
        f"Greedy answers (argmax, up to {prompts.get('max_new_tokens')} tokens) to {prompts.get('count')} held-out "
        f"prompts ({prompts.get('source')}), compared with the registered model (adapter on base) token for token.",
        "",
        _figures_table(exports),
    ]
    if champion.description.strip():
        lines += ["", "## Registered model card", "", _demote_headings(champion.description.strip())]
    return "\n".join(lines).rstrip() + "\n"


def render_adapter_readme(champion: ChampionVersion, *, base_model: str, adapter_name: str, command: str,
                          facts: Mapping[str, Any]) -> str:
    """The adapter folder's README.md: what it is and the `vllm serve` line that loads it."""
    return "\n".join([
        f"# {champion.model_name} v{champion.version}: LoRA adapter",
        "",
        f"The PEFT LoRA adapter of `{champion.model_uri}` (rank {facts.get('r')}, alpha {facts.get('lora_alpha')}, "
        f"on {', '.join(facts.get('target_modules') or []) if isinstance(facts.get('target_modules'), list) else facts.get('target_modules')}), "
        f"for the base model `{base_model}`.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Requests name the adapter as the model: `{{\"model\": \"{adapter_name}\", \"messages\": [...]}}`.",
        "",
    ])
