"""Chat templates: the shipped ones in sft_pipeline/templates/, and choosing the Jinja text to render with."""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent.parent / "templates"


def shipped_templates() -> list[str]:
    """Names of the templates in sft_pipeline/templates/."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def resolve_template(tokenizer, template: str = "tokenizer") -> tuple[str, str]:
    """(Jinja text, name) for `template`: "tokenizer", a shipped template name, or a .jinja path."""
    if template == "tokenizer":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one renders chats
            text = text.get("default")
        if not text:
            raise ValueError(
                "the tokenizer has no chat template; set template to 'chatml' (or another shipped "
                "name or a .jinja path)"
            )
        return text, "tokenizer"
    if template.endswith(".jinja"):
        path = Path(template).expanduser()
        if not path.is_file():
            raise ValueError(f"template file does not exist: {template!r}")
        return path.read_text(encoding="utf-8"), f"file:{path.name}"
    path = TEMPLATES_DIR / f"{template}.jinja"
    if not path.is_file():
        raise ValueError(f"unknown template {template!r}; shipped templates: {shipped_templates()}")
    return path.read_text(encoding="utf-8"), template
