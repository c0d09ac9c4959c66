"""The base model: `base_model`, resolved once into Hugging Face format and reused."""

import os

import dagster as dg

from sft_pipeline.defs.metadata import config_from_dataclass, domain_kwargs
from sft_pipeline.defs.resources import PipelineStorage
from sft_pipeline.model_resolution import BaseModelInfo, BaseModelSpec, default_base_model_source, resolve_base_model

# Bump when this stage's logic changes, so Dagster marks its assets stale.
CODE_VERSION = "3"
GROUP = "models"

BaseModelConfig = config_from_dataclass(BaseModelSpec, "BaseModelConfig")


@dg.asset(code_version=CODE_VERSION, group_name=GROUP, kinds={"huggingface"})
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, storage: PipelineStorage) -> dg.MaterializeResult[BaseModelInfo]:
    """The base model and tokenizer, converted to Hugging Face format once and reused while the source is unchanged."""
    spec = BaseModelSpec(**domain_kwargs(config, BaseModelSpec))
    # SFT_PIPELINE_BASE_MODEL sets the deployment-wide default, e.g. for a UI where people click Materialize.
    source = spec.source or os.environ.get("SFT_PIPELINE_BASE_MODEL") or default_base_model_source()
    info = resolve_base_model(
        source,
        storage.asset_dir("base_model"),
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        default_chat_template=spec.default_chat_template,
        hub_cache_dir=spec.hub_cache_dir,
    )
    context.log.info("base model at %s (%s)", info.path, "reused" if info.reused else "converted")
    return dg.MaterializeResult(
        value=info,
        metadata={
            "path": dg.MetadataValue.path(info.path),
            "source": info.source,
            "revision": info.revision,
            "content_hash": info.content_hash,
            "model_type": info.model_type,
            "num_parameters": info.num_parameters,
            "dtype": info.dtype,
            "has_chat_template": info.has_chat_template,
            "chat_template_source": info.chat_template_source,
            "trust_remote_code": info.trust_remote_code,
            "reused": info.reused,
        },
        # Folders converted before content hashes were recorded fall back to the source's hash.
        data_version=dg.DataVersion(info.content_hash or info.revision),
    )
