"""What an export of the champion holds and how strictly each part is checked: `ExportSettings`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sft_pipeline.hashing import json_digest

# GGUF types the converter writes itself (`convert_hf_to_gguf.py --outtype`), with the share of greedy tokens
# that must agree with the registered model. The figures: SmolLM2-135M-Instruct, 8 prompts x 48 greedy tokens,
# teacher-forced agreement along the registered model's answers: f16 1.0, bf16 1.0, q8_0 0.97. f32 is lossless,
# so it must agree everywhere; the others keep a margin below what was measured, so a fine-tuned model that
# lands a few near-ties differently still passes and a broken conversion (agreement near chance) does not.
GGUF_MIN_AGREEMENT = {"f32": 1.0, "f16": 0.98, "bf16": 0.95, "q8_0": 0.90}
GGUF_QUANTIZATIONS = tuple(GGUF_MIN_AGREEMENT)


@dataclass
class ExportSettings:
    """What `champion_export` writes for the version aliased `champion`, and how it checks each export."""

    merged: bool = field(default=True, metadata={"help": "Write the adapter merged into the base model as a standard "
                                                         "Hugging Face folder (safetensors, tokenizer, chat template, "
                                                         "generation config, model card)."})
    adapter: bool = field(default=True, metadata={"help": "Write the LoRA adapter in the layout `vllm serve <base> "
                                                          "--enable-lora --lora-modules name=path` loads."})
    gguf_quantization: str = field(default="q8_0", metadata={
        "help": f"GGUF type written by llama.cpp's converter: one of {', '.join(GGUF_QUANTIZATIONS)}; empty: no GGUF."})
    gguf_pre_tokenizer: str = field(default="", metadata={
        "help": "llama.cpp pre-tokenizer name (e.g. gpt-2, llama-bpe, smollm) to record when the converter does not "
                "recognize the tokenizer (a tokenizer of your own); empty: the converter must recognize it."})
    gguf_min_agreement: float | None = field(default=None, metadata={
        "help": "Share of the registered model's greedy tokens the GGUF model must reproduce; empty: the default of "
                "the quantization (f32 1.0, f16 0.98, bf16 0.95, q8_0 0.90)."})
    adapter_name: str = field(default="sft", metadata={"help": "The LoRA module name clients ask vLLM for "
                                                               "(`--lora-modules <name>=<path>`, request `model: <name>`)."})
    num_prompts: int = field(default=8, metadata={"help": "Held-out prompts (from the version's test split) whose "
                                                          "greedy answers every export must reproduce."})
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens generated per prompt by the registered model."})

    def __post_init__(self) -> None:
        self.gguf_quantization = (self.gguf_quantization or "").strip().lower()
        if self.gguf_quantization and self.gguf_quantization not in GGUF_MIN_AGREEMENT:
            raise ValueError(f"gguf_quantization must be one of {', '.join(GGUF_QUANTIZATIONS)} or empty, "
                             f"got {self.gguf_quantization!r}")
        if self.gguf_min_agreement is not None and not 0.0 <= self.gguf_min_agreement <= 1.0:
            raise ValueError(f"gguf_min_agreement must be in [0, 1], got {self.gguf_min_agreement}")
        if self.num_prompts < 1 or self.max_new_tokens < 1:
            raise ValueError("num_prompts and max_new_tokens must be at least 1")
        if not self.adapter_name or any(c in self.adapter_name for c in " =/"):
            raise ValueError(f"adapter_name must be non-empty without spaces, '=' or '/', got {self.adapter_name!r}")
        if not (self.merged or self.adapter or self.gguf_quantization):
            raise ValueError("nothing to export: enable merged, adapter or a gguf_quantization")

    @property
    def gguf_tolerance(self) -> float:
        """The share of greedy tokens the GGUF model must reproduce."""
        if self.gguf_min_agreement is not None:
            return float(self.gguf_min_agreement)
        return GGUF_MIN_AGREEMENT.get(self.gguf_quantization, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Digest of the settings: part of the export folder's key (a new quantization is a new export)."""
        return json_digest(self.to_dict())
