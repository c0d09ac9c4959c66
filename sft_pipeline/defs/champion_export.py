"""Deployment: `champion_export`, the version aliased `champion` as merged weights, a vLLM adapter and GGUF.

The export follows the alias, not the upstream hand-off: `registered_model` may have registered a version
that did not win (the champion stays), and the alias can be moved by hand in MLflow (a rollback). The
sensor `champion_export_sensor` (automation_export.py) re-materializes this asset when the alias moves.
"""

import json

import dagster as dg
import pydantic

from sft_pipeline.defs.metadata import config_from_dataclass, domain_kwargs
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.export import ChampionExportInfo, ExportSettings, export_champion
from sft_pipeline.registry.register import RegistrationInfo

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"

ChampionExportConfig = config_from_dataclass(
    ExportSettings,
    "ChampionExportConfig",
    champion_alias=(str, pydantic.Field(default="champion", description="The alias whose version is exported.")),
)


def figures_markdown(info: ChampionExportInfo) -> str:
    """One row per export: status, identical greedy answers, token agreement, what was required."""
    rows = ["| export | status | identical answers | token agreement | required | where |", "|---|---|---|---|---|---|"]
    for name, entry in info.exports.items():
        figures = entry.get("figures") or {}
        if entry.get("status") != "verified":
            rows.append(f"| {name} | skipped: {entry.get('reason', '')} | | | | |")
            continue
        agreement = figures.get("token_agreement", figures.get("leading_token_share", 0.0))
        rows.append(f"| {name} | verified | {figures.get('identical_answers')}/{figures.get('prompts')} | {agreement:.4f} | "
                    f"{figures.get('required', '')} | `{entry.get('path', '')}` |")
    return "\n".join(rows)


def export_metadata(info: ChampionExportInfo, registered_model: RegistrationInfo, asset_dir: str) -> dict:
    metadata: dict = {
        # the export's folder; with no champion, the asset's folder where exports land
        "path": dg.MetadataValue.path(info.path or asset_dir),
        "champion_version": info.version if info.version is not None else -1,
        "model_sha256": info.model_sha256,
        "input_version": registered_model.version,
        "reused": info.reused,
        "note": info.note,
    }
    if not info.exported:
        return metadata
    metadata.update({
        "key": info.key,
        "champion_uri": f"models:/{info.model_name}/{info.version}",
        "verification": dg.MetadataValue.md(figures_markdown(info)),
        "figures": dg.MetadataValue.json({name: entry.get("figures") or {"status": entry.get("status"),
                                                                         "reason": entry.get("reason", "")}
                                          for name, entry in info.exports.items()}),
        "prompts": dg.MetadataValue.json(info.prompts),
    })
    for name, entry in info.exports.items():
        if entry.get("status") == "verified":
            metadata[f"{name}_path"] = dg.MetadataValue.path(entry["path"])
        else:
            metadata[f"{name}_skipped"] = entry.get("reason", "")
    for name in ("merged", "adapter"):
        command = (info.exports.get(name) or {}).get("vllm_command")
        if command:
            metadata[f"vllm_serve_{name}"] = dg.MetadataValue.md(f"```bash\n{command}\n```")
    gguf = info.exports.get("gguf") or {}
    if gguf.get("status") == "verified":
        metadata["gguf_quantization"] = gguf["quantization"]
        metadata["gguf_bytes"] = int(gguf["bytes"])
        metadata["ollama_modelfile"] = dg.MetadataValue.path(gguf["modelfile"])
    return metadata


@dg.asset(code_version=CODE_VERSION, group_name="deployment", kinds={"huggingface", "mlflow"}, pool="export")
def champion_export(
    context: dg.AssetExecutionContext, config: ChampionExportConfig, storage: PipelineStorage, mlflow_tracking: MlflowTracking,
    registered_model: RegistrationInfo,
) -> dg.MaterializeResult[ChampionExportInfo]:
    """The version aliased champion (looked up in MLflow) as a merged Hugging Face folder, a vLLM LoRA adapter and
    GGUF, each verified against the registered model's greedy answers; reused while the champion does not move."""
    settings = ExportSettings(**domain_kwargs(config, ExportSettings))
    root = storage.asset_dir("champion_export")
    info = export_champion(mlflow_tracking.tracking_uri, registered_model.model_name or mlflow_tracking.registered_model_name,
                           root, settings, alias=config.champion_alias, log=context.log.info)
    if info.exported and info.version != registered_model.version:
        context.log.info("exported %s version %s (the %s), not version %s that registered_model handed over",
                         info.model_name, info.version, config.champion_alias, registered_model.version)
    data_version = info.digest if info.exported else f"no-{config.champion_alias}"
    context.log.info("figures: %s", json.dumps({k: v.get("figures") for k, v in info.exports.items()}, default=str))
    return dg.MaterializeResult(value=info, metadata=export_metadata(info, registered_model, str(root)),
                                data_version=dg.DataVersion(data_version))
