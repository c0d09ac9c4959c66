"""Chat templates: the shipped ones in sft_pipeline/templates/, and choosing the Jinja text to render with."""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent.parent / "templates"


def shipped_templates() -> list[str]:
    """Names of the templates in sft_pipeline/templates/."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def _tokenizer_template_file(tokenizer) -> str:
    """Where a tokenizer's own chat template was read from, for error messages."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name) if name.endswith(".jinja") else f"{folder / name} (its chat_template)"
    return f"of the tokenizer {str(folder) or '(unnamed)'}"


def check_template_syntax(text: str, where: str) -> None:
    """Raise ValueError naming `where` (the template's file) and the line when `text` is not valid Jinja.

    Compiled by transformers' own environment (the one apply_chat_template renders with, which knows
    `{% generation %}`), so a template is judged by the rules it will run under. Checked once, up front:
    otherwise a syntax error surfaces as the failure of whichever data row is rendered first.
    """
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # private API moved: a bad template is then reported when the first row renders
        return
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as exc:
        lines = text.splitlines()
        source = lines[exc.lineno - 1].strip() if exc.lineno and 0 < exc.lineno <= len(lines) else ""
        raise ValueError(
            f"chat template {where}, line {exc.lineno}: {exc.message}" + (f"\n    {source}" if source else "")
        ) from exc


def resolve_template(tokenizer, template: str = "tokenizer") -> tuple[str, str]:
    """(Jinja text, name) for `template`: "tokenizer", a shipped template name, or a .jinja path.

    Raises ValueError for a missing template, or one with a Jinja syntax error (naming its file and line).
    """
    text, name, where = _template_text(tokenizer, template)
    check_template_syntax(text, where)
    return text, name


def _template_text(tokenizer, template: str) -> tuple[str, str, str]:
    """(Jinja text, name, the file it came from)."""
    if template == "tokenizer":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one renders chats
            text = text.get("default")
        if not text:
            raise ValueError(
                "the tokenizer has no chat template; set template to 'chatml' (or another shipped "
                "name or a .jinja path)"
            )
        return text, "tokenizer", _tokenizer_template_file(tokenizer)
    if template.endswith(".jinja"):
        path = Path(template).expanduser()
        if not path.is_file():
            raise ValueError(f"template file does not exist: {template!r}")
        return path.read_text(encoding="utf-8"), f"file:{path.name}", str(path)
    path = TEMPLATES_DIR / f"{template}.jinja"
    if not path.is_file():
        raise ValueError(f"unknown template {template!r}; shipped templates: {shipped_templates()}")
    return path.read_text(encoding="utf-8"), template, str(path)
