"""Settings of augmentation: the Self-Instruct run (`SelfInstructConfig`) and its teacher (`TeacherConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Config fields that bound a run but do not change what any round generates: a journal made with
# other values is reused (and extended, or cut short) instead of starting over.
BUDGET_FIELDS = ("num_instructions", "max_attempts")
BACKENDS = ("local", "hf", "openai")


@dataclass
class SelfInstructConfig:
    """Settings of one Self-Instruct run; defaults fit the CPU demo."""

    num_instructions: int = field(default=4, metadata={"help": "Target number of accepted synthetic rows; 0 skips generation."})
    max_attempts: int = field(default=8, metadata={"help": "Budget of teacher calls (each batched call counts once: instructions, instances and outputs). A round starts only while it can finish within the budget."})
    seed_tasks_per_prompt: int = field(default=8, metadata={"help": "k: example tasks shown in each instruction prompt (Self-Instruct: 8)."})
    synthetic_tasks_per_prompt: int = field(default=2, metadata={"help": "How many of the k examples are earlier synthetic tasks once some exist (Self-Instruct: 2 of 8); the rest are human seeds."})
    new_tasks_per_prompt: int = field(default=2, metadata={"help": "New instructions asked for in each instruction prompt."})
    generate_inputs: bool = field(default=True, metadata={"help": "Input-first instances: the teacher writes an input for tasks that need one before answering (one extra call per round). Off: non-classification tasks are answered from the instruction alone."})
    max_new_tokens_instruction: int = field(default=64, metadata={"help": "Token limit when the teacher writes new instructions (for all new_tasks_per_prompt of them)."})
    max_new_tokens_instance: int = field(default=48, metadata={"help": "Token limit when the teacher writes an input, or a class label and input."})
    max_new_tokens_response: int = field(default=128, metadata={"help": "Token limit when the teacher answers an instruction."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    rouge_threshold: float = field(default=0.7, metadata={"help": "Reject a candidate whose ROUGE-L F1 to any pool or benchmark text is above this."})
    min_instruction_words: int = field(default=3, metadata={"help": "Reject instructions with fewer words."})
    max_instruction_words: int = field(default=150, metadata={"help": "Reject instructions with more words."})
    min_response_chars: int = field(default=2, metadata={"help": "Reject responses shorter than this (after stripping)."})
    seed: int = field(default=0, metadata={"help": "Seed for example sampling and teacher sampling; same seed, same output."})
    batch_size: int = field(default=4, metadata={"help": "Instruction prompts per teacher call (one round)."})

    def __post_init__(self) -> None:
        minimums = {
            "num_instructions": 0, "max_attempts": 0, "seed_tasks_per_prompt": 1, "synthetic_tasks_per_prompt": 0,
            "new_tasks_per_prompt": 1, "max_new_tokens_instruction": 1, "max_new_tokens_instance": 1,
            "max_new_tokens_response": 1, "min_instruction_words": 0, "max_instruction_words": 1,
            "min_response_chars": 0, "batch_size": 1,
        }
        for name, lowest in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {value}")
        if self.synthetic_tasks_per_prompt > self.seed_tasks_per_prompt:
            raise ValueError(
                f"synthetic_tasks_per_prompt ({self.synthetic_tasks_per_prompt}) must be <= "
                f"seed_tasks_per_prompt ({self.seed_tasks_per_prompt})"
            )
        if self.num_instructions > 0 and self.max_attempts < self.calls_per_round:
            raise ValueError(
                f"max_attempts must be >= {self.calls_per_round} when num_instructions > 0 "
                f"(one round makes up to {self.calls_per_round} teacher calls), got {self.max_attempts}"
            )
        if self.max_instruction_words < self.min_instruction_words:
            raise ValueError(
                f"max_instruction_words ({self.max_instruction_words}) must be >= "
                f"min_instruction_words ({self.min_instruction_words})"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.rouge_threshold <= 1:
            raise ValueError(f"rouge_threshold must be in [0, 1], got {self.rouge_threshold}")

    @property
    def calls_per_round(self) -> int:
        """Most teacher calls one round makes: instructions, instances, and (input-first) outputs."""
        return 3 if self.generate_inputs else 2

    def generation_fields(self) -> dict[str, Any]:
        """The settings that change what a round generates (everything but the budget)."""
        return {k: v for k, v in asdict(self).items() if k not in BUDGET_FIELDS}

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for Dagster config descriptions and docs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass
class TeacherConfig:
    """Which model writes the synthetic data, and how to reach it."""

    backend: str = field(default="local", metadata={"help": "local: the pipeline's base model (offline, batched); hf: any Hugging Face model id or folder; openai: an OpenAI-compatible chat completions endpoint (vLLM, TGI, llama.cpp server, hosted APIs)."})
    model: str = field(default="", metadata={"help": "hf: a hub id or local folder; openai: the served model name. Ignored by local."})
    base_url: str = field(default="", metadata={"help": "openai: the API root, e.g. http://localhost:8000/v1 (requests go to {base_url}/chat/completions)."})
    api_key_env: str = field(default="", metadata={"help": "openai: NAME of the environment variable holding the API key (read at run time, never stored); empty sends no key."})
    timeout_s: float = field(default=60.0, metadata={"help": "openai: seconds to wait for one HTTP response."})
    retries: int = field(default=3, metadata={"help": "openai: extra tries after a timeout, connection error, 429 or 5xx."})
    backoff_s: float = field(default=1.0, metadata={"help": "openai: first retry delay in seconds; doubles each retry (with jitter, capped at 30 s, Retry-After honoured)."})
    concurrency: int = field(default=4, metadata={"help": "openai: most requests in flight at once."})
    revision: str = field(default="", metadata={"help": "hf: hub revision (branch, tag or commit); empty is the default branch."})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "hf" and not self.model:
            raise ValueError("model must name a Hugging Face model id or folder when backend is 'hf'")
        if self.backend == "openai":
            if not self.base_url:
                raise ValueError("base_url is required when backend is 'openai' (e.g. http://localhost:8000/v1)")
            if not self.model:
                raise ValueError("model is required when backend is 'openai' (the served model name)")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


__all__ = ["BACKENDS", "BUDGET_FIELDS", "SelfInstructConfig", "TeacherConfig"]
