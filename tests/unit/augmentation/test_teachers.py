"""Teacher backends: the OpenAI-compatible HTTP teacher against a loopback server, the local HF teacher."""

from __future__ import annotations

import pytest

from sft_pipeline.augmentation.config import TeacherConfig
from sft_pipeline.augmentation.prompts import build_instruction_prompt, build_response_prompt
from sft_pipeline.augmentation.teachers import (
    LocalHFTeacher,
    OpenAICompatibleTeacher,
    Teacher,
    TeacherError,
    build_teacher,
    teacher_identity,
)
from tests.unit.augmentation.helpers import ChatServer, chat_prompt


def test_http_teacher_retries_a_503_and_sends_the_key():
    with ChatServer(fail_first=1) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "teacher-model", api_key="sk-test", backoff_s=0.01, retries=2)
        out = teacher.generate([chat_prompt("hello")], max_new_tokens=7, temperature=0.5, top_p=0.9, seed=11)
    assert out == ["echo: hello"]
    assert len(server.requests) == 2 and teacher.retries_used == 1
    body = server.requests[-1]
    assert body["model"] == "teacher-model" and body["max_tokens"] == 7 and body["seed"] == 11
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["messages"] == chat_prompt("hello")
    assert server.headers[-1]["Authorization"] == "Bearer sk-test"
    assert "sk-test" not in repr(teacher)


def test_http_teacher_keeps_order_and_limits_concurrency():
    with ChatServer(delay_s=0.05) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", concurrency=2, backoff_s=0.01)
        prompts = [chat_prompt(f"prompt {i}") for i in range(8)]
        out = teacher.generate(prompts, max_new_tokens=5, temperature=0.0, top_p=1.0, seed=100)
    assert out == [f"echo: prompt {i}" for i in range(8)]
    assert server.max_in_flight == 2  # parallel, but never more than the limit
    assert sorted(r["seed"] for r in server.requests) == list(range(100, 108))  # one seed per prompt


def test_http_teacher_gives_up_and_does_not_retry_client_errors():
    with ChatServer(fail_first=10) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", retries=2, backoff_s=0.01)
        with pytest.raises(TeacherError, match="after 3 attempts.*503.*overloaded"):
            teacher.generate([chat_prompt("x")], 5, 0.0, 1.0, 0)
    assert len(server.requests) == 3
    with ChatServer(fail_first=10, fail_status=400) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", retries=3, backoff_s=0.01)
        with pytest.raises(TeacherError, match="HTTP 400: overloaded"):
            teacher.generate([chat_prompt("x")], 5, 0.0, 1.0, 0)
    assert len(server.requests) == 1


def test_http_teacher_retries_after_a_timeout():
    with ChatServer(slow_first=1) as server:
        teacher = OpenAICompatibleTeacher(server.base_url, "m", timeout_s=0.3, retries=1, backoff_s=0.01)
        assert teacher.generate([chat_prompt("late")], 5, 0.0, 1.0, 0) == ["echo: late"]
    assert len(server.requests) == 2


def test_build_teacher_reads_the_key_from_the_named_env_var():
    cfg = TeacherConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="SFT_TEST_TEACHER_KEY")
    with pytest.raises(ValueError, match="SFT_TEST_TEACHER_KEY"):
        build_teacher(cfg, environ={})
    teacher = build_teacher(cfg, environ={"SFT_TEST_TEACHER_KEY": "secret"})
    assert isinstance(teacher, OpenAICompatibleTeacher) and teacher.name == "m"
    assert teacher.fingerprint == teacher_identity(cfg) == "openai:m@http://127.0.0.1:9/v1"
    for kwargs, name in [({"backend": "tgi"}, "backend"), ({"backend": "openai", "model": "m"}, "base_url"),
                         ({"backend": "hf"}, "model"), ({"concurrency": 0}, "concurrency"), ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=name):
            TeacherConfig(**kwargs)


def test_local_hf_teacher_batch_and_determinism(tiny_model_dir):
    teacher = LocalHFTeacher(tiny_model_dir)
    assert isinstance(teacher, Teacher) and teacher.name
    prompts = [build_instruction_prompt(["Write a poem.", "Name a city."]), build_response_prompt("Hi")]
    out1 = teacher.generate(prompts, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=3)
    out2 = teacher.generate(prompts, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=3)
    assert len(out1) == 2 and all(isinstance(o, str) for o in out1)
    assert out1 == out2
    assert not any("<|im_end|>" in o or "<|im_start|>" in o for o in out1)
    greedy = teacher.generate(prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    assert greedy == teacher.generate(prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=99)
    assert build_teacher(TeacherConfig(backend="hf", model=str(tiny_model_dir))).fingerprint == teacher.fingerprint
