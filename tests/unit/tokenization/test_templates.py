"""Tests for sft_pipeline.tokenization.templates: an invalid chat template is reported with its file and line."""

from __future__ import annotations

import shutil

import pytest

from sft_pipeline.tokenization import templates
from sft_pipeline.tokenization.config import TokenizationConfig
from sft_pipeline.tokenization.dataset import build_sft_dataset
from sft_pipeline.tokenization.templates import resolve_template
from tests.unit.tokenization.samples import make_rows

# Line 3 closes an expression with a single brace: a Jinja syntax error.
BROKEN = "{% for m in messages %}\n{{ '<|im_start|>' + m['role'] + '\\n' }}\n{{ m['content'] }\n{% endfor %}\n"


def test_broken_template_file_names_file_and_line_not_a_row(tiny_model_dir, tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text(BROKEN)
    with pytest.raises(ValueError) as caught:
        build_sft_dataset(make_rows(5), tiny_model_dir, tmp_path / "ds", TokenizationConfig(template=str(path)))
    message = str(caught.value)
    assert str(path) in message and "line 3" in message and "m['content'] }" in message
    assert "row " not in message
    assert not (tmp_path / "ds").exists()


def test_broken_shipped_template_names_its_file(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "mine.jinja").write_text(BROKEN)
    monkeypatch.setattr(templates, "TEMPLATES_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"mine\.jinja.*line 3"):
        resolve_template(tokenizer, "mine")


def test_broken_tokenizer_template_names_the_tokenizer_file(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        if "token" in path.name or path.name == "chat_template.jinja":
            shutil.copy(path, folder / path.name)
    (folder / "chat_template.jinja").write_text(BROKEN)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"chat_template\.jinja.*line 3"):
        resolve_template(tokenizer, "tokenizer")


def test_valid_templates_still_resolve(tokenizer):
    for name in ["tokenizer"] + templates.shipped_templates():
        text, _ = resolve_template(tokenizer, name)
        assert text
