"""Teacher backends for Self-Instruct: a local or hub Hugging Face model, an OpenAI-compatible HTTP endpoint.

Every backend turns a batch of chat-message prompts into one completion per prompt, in order, and is
deterministic for a given seed where the backend allows it (the local model always; an HTTP server when
it honours the request's `seed`). `build_teacher` picks one from a `TeacherConfig`.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sft_pipeline.augmentation.config import BACKENDS, TeacherConfig

# HTTP statuses worth another try: rate limits, timeouts and server-side failures.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@runtime_checkable
class Teacher(Protocol):
    """Anything that turns chat-message prompts into completions."""

    name: str

    def generate(
        self, prompts: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        """One completion (new text only) per prompt, deterministic for a given seed."""
        ...


class TeacherError(RuntimeError):
    """A teacher call failed for good (a non-retryable HTTP status, or retries exhausted)."""


def teacher_fingerprint(teacher: Any) -> str:
    """What identifies a teacher's outputs (used to key cached generations): `fingerprint`, else `name`."""
    return str(getattr(teacher, "fingerprint", None) or getattr(teacher, "name", type(teacher).__name__))


# --------------------------------------------------------------------------------------------
# Local Hugging Face model
# --------------------------------------------------------------------------------------------


class LocalHFTeacher:
    """A Hugging Face causal LM (local folder or hub id), prompted through its chat template, batched."""

    def __init__(self, model_dir: str | Path, name: str | None = None, device: str | None = None, revision: str | None = None) -> None:
        import torch

        from sft_pipeline.modeling import load_causal_lm, load_tokenizer

        self.model_dir = model_dir
        local = Path(str(model_dir)).exists()
        self.name = name or (Path(str(model_dir)).name if local else str(model_dir))
        # A local folder is identified by its path (the base_model asset names folders by content hash);
        # a hub id by id and revision.
        self.fingerprint = f"hf:{Path(str(model_dir)).resolve() if local else model_dir}@{revision or 'default'}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {"revision": revision} if revision else {}
        # Decoder-only generation needs left padding so every row's new tokens start at the same column.
        self.tokenizer = load_tokenizer(model_dir, padding_side="left", **kwargs)
        self.model = load_causal_lm(model_dir, device=self.device, **kwargs)

    def generate(
        self, prompts: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        import torch

        if not prompts:
            return []
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        # The template already adds BOS/role markers; adding special tokens again would double them.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False)
        # fork_rng keeps the caller's global RNG state untouched while we reseed for determinism.
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint (vLLM, TGI, llama.cpp server, hosted APIs)
# --------------------------------------------------------------------------------------------


class OpenAICompatibleTeacher:
    """POSTs `{base_url}/chat/completions`, one request per prompt, at most `concurrency` in flight.

    Retries connection errors, timeouts and the statuses in RETRY_STATUSES with exponential backoff
    (honouring `Retry-After`); any other error status fails at once with the server's message.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        concurrency: int = 4,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is required for an OpenAI-compatible teacher (e.g. http://localhost:8000/v1)")
        if not model:
            raise ValueError("model is required for an OpenAI-compatible teacher (the served model name)")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = model
        self.fingerprint = f"openai:{model}@{base_url.rstrip('/')}"
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = concurrency
        self.extra_body = dict(extra_body or {})
        self.requests_sent = 0  # every HTTP attempt, retries included
        self.retries_used = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatibleTeacher(url={self.url!r}, model={self.model!r})"

    def generate(
        self, prompts: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        if not prompts:
            return []
        bodies = [
            {
                "model": self.model,
                "messages": p,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                # One seed per prompt so identical prompts in a batch still differ; servers that support
                # `seed` (vLLM, OpenAI) then return the same text for the same request.
                "seed": (seed + i) % 2**31,
                "n": 1,
                **self.extra_body,
            }
            for i, p in enumerate(prompts)
        ]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            return list(pool.map(self._complete, bodies))

    def _complete(self, body: dict[str, Any]) -> str:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retries_used += 1
            with self._lock:
                self.requests_sent += 1
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return _completion_text(payload)
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code not in RETRY_STATUSES:
                    raise TeacherError(f"POST {self.url} returned HTTP {err.code}: {detail}") from None
                last_error = f"HTTP {err.code}: {detail}"
                retry_after = _retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last_error = f"{type(err).__name__}: {reason}"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                # A 200 with a body that is not a chat completion: retrying the same request will not fix it.
                raise TeacherError(f"POST {self.url} returned an unreadable chat completion: {err}") from None
            if attempt < self.retries:
                delay = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
                delay = delay * (0.5 + random.random() / 2)  # jitter so parallel workers do not retry in lockstep
                if retry_after is not None:
                    delay = min(max(delay, retry_after), self.max_backoff_s)
                time.sleep(delay)
        raise TeacherError(f"POST {self.url} failed after {self.retries + 1} attempts; last error: {last_error}")


def _completion_text(payload: dict[str, Any]) -> str:
    choice = payload["choices"][0]
    message = choice.get("message")
    if message is not None:
        content = message.get("content")
    else:  # some servers answer chat requests in the completions shape
        content = choice["text"]
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "").strip()


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - best effort only
        text = ""
    try:
        parsed = json.loads(text)
        message = parsed.get("error", parsed)
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except (ValueError, AttributeError):
        pass
    return (text or err.reason or "").strip()[:300]


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------


def build_teacher(cfg: TeacherConfig, local_model_dir: str | Path | None = None, environ: dict[str, str] | None = None) -> Teacher:
    """The teacher `cfg` names; `local_model_dir` is the base model folder the local backend uses."""
    environ = os.environ if environ is None else environ
    if cfg.backend == "local":
        if not local_model_dir:
            raise ValueError("the local teacher backend needs the base model folder")
        return LocalHFTeacher(local_model_dir)
    if cfg.backend == "hf":
        return LocalHFTeacher(cfg.model, revision=cfg.revision or None)
    api_key = None
    if cfg.api_key_env:
        api_key = environ.get(cfg.api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {cfg.api_key_env!r} (api_key_env) is not set or empty")
    return OpenAICompatibleTeacher(
        cfg.base_url, cfg.model, api_key=api_key, timeout_s=cfg.timeout_s, retries=cfg.retries,
        backoff_s=cfg.backoff_s, concurrency=cfg.concurrency,
    )


def teacher_identity(cfg: TeacherConfig, local_model_dir: str | Path | None = None) -> str:
    """The fingerprint `build_teacher(cfg, local_model_dir)` would have, without loading or calling anything."""
    if cfg.backend == "local":
        return f"hf:{Path(str(local_model_dir)).resolve()}@default"
    if cfg.backend == "hf":
        local = Path(cfg.model).exists()
        return f"hf:{Path(cfg.model).resolve() if local else cfg.model}@{cfg.revision or 'default'}"
    return f"openai:{cfg.model}@{cfg.base_url.rstrip('/')}"


__all__ = [
    "BACKENDS", "Teacher", "TeacherError", "LocalHFTeacher", "OpenAICompatibleTeacher", "TeacherConfig",
    "build_teacher", "teacher_fingerprint", "teacher_identity",
]
