"""The README's "load the champion" snippet, run as written (only the tracking store and model name swapped for
the test's), answers: what a user pastes after `make demo` works."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def champion_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matching = [b for b in blocks if "@champion" in b]
    assert len(matching) == 1, f"README.md: expected one python block loading the champion, found {len(matching)}"
    return matching[0]


def test_readme_champion_snippet_loads_and_answers(registered):
    uri = registered[0]
    code = champion_snippet()
    assert 'mlflow.set_tracking_uri("sqlite:///mlflow.db")' in code and "models:/sft_pipeline_model@champion" in code
    code = code.replace("sqlite:///mlflow.db", uri).replace("models:/sft_pipeline_model@champion", "models:/tiny-sft@champion")
    out, namespace = io.StringIO(), {"__name__": "readme_snippet"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    reply = namespace["reply"]
    print(reply)
    choice = reply[0]["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert reply[0]["usage"]["completion_tokens"] > 0  # the champion generated an answer
    assert out.getvalue() == choice["message"]["content"] + "\n"  # and the snippet printed it
