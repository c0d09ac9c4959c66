"""`mlflow models serve -m models:/<name>@champion` answers OpenAI-style chat requests over HTTP: a real server on
a free loopback port, a real request, the answer checked against the model's own greedy answer, the schema, a 4xx
with a reason for malformed requests, and a clean shutdown (process gone, port free)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sft_pipeline.registry.log import CHAT_TASK

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8
START_TIMEOUT_S = 300  # loading torch + transformers + the model on two busy cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on the port now (as uvicorn does: connections of the old one that
    linger in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
        return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def post(url: str, body: bytes) -> tuple[int, dict | list | str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture
def server(registered, tmp_path):
    """`mlflow models serve` on the champion, in its own process group; stopped and checked on the way out."""
    uri = registered[0]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # mlflow starts `uvicorn` by name: the interpreter's own bin folder first
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-sft@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    state = {"process": process, "port": port, "stopped": False}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no answer on {base}/ping:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield base, state
    finally:
        # The group this fixture started (mlflow and the uvicorn it runs), whatever the test did.
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 30
            while group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()


def expected_answer(uri: str) -> str:
    """The champion's own greedy answer to QUESTION, computed in process with transformers (adapter on base)."""
    import torch

    from sft_pipeline.registry import load_registered_model

    components = load_registered_model(uri, "models:/tiny-sft@champion", flavor="transformers", return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_champion_is_logged_as_a_chat_model(registered):
    from mlflow.models import get_model_info

    from sft_pipeline.tracking import use_tracking_uri

    with use_tracking_uri(registered[0]):
        info = get_model_info("models:/tiny-sft@champion")
    assert info.flavors["transformers"]["inference_task"] == CHAT_TASK
    assert info.metadata["task"] == CHAT_TASK
    assert [i["name"] for i in info.signature.inputs.to_dict()][:3] == ["messages", "temperature", "max_tokens"]


def test_pyfunc_predict_takes_chat_requests_and_without_a_chat_template_plain_strings(registered, trained, tiny_model_dir,
                                                                                       store):
    from sft_pipeline.registry import load_registered_model, register_model

    uri = registered[0]
    chat = load_registered_model(uri, "models:/tiny-sft@champion")
    reply = chat.predict({"messages": QUESTION, "max_tokens": 4})
    assert reply[0]["object"] == "chat.completion" and isinstance(reply[0]["choices"][0]["message"]["content"], str)
    # logged without the chat template: the text-generation task as before, a string in and a string out
    info = register_model(uri, "tiny-text", trained.adapter_dir, tiny_model_dir, metrics={}, params={}, tags={},
                          use_chat_template=False)
    text = load_registered_model(uri, info.model_uri)
    assert text.metadata.metadata["serving_task"] == "text-generation"
    assert isinstance(text.predict(["What is the capital of France?"], params={"max_new_tokens": 3})[0], str)


def test_served_champion_answers_openai_chat_requests_and_shuts_down_cleanly(registered, server):
    base, state = server
    status, body = post(f"{base}/invocations", json.dumps(
        {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}).encode())
    assert status == 200, body
    # the chat.completion schema, one per request
    assert isinstance(body, list) and len(body) == 1
    completion = body[0]
    assert completion["object"] == "chat.completion" and isinstance(completion["id"], str)
    assert isinstance(completion["created"], int) and isinstance(completion["model"], str)
    choice = completion["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant"
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS and usage["prompt_tokens"] > 5
    # the answer is the champion's own greedy answer
    assert choice["message"]["content"].strip() == expected_answer(registered[0])

    # malformed requests: a 4xx with a reason, never a 500
    for bad in (b'{"messages": [{"role": "user", "content": "x"}',  # not JSON
                json.dumps({"messages": "What is the capital of France?"}).encode(),  # messages not a list
                json.dumps({"messages": [{"content": "no role"}]}).encode(),  # a message without a role
                json.dumps({"prompt": "no messages at all"}).encode()):
        status, reply = post(f"{base}/invocations", bad)
        assert 400 <= status < 500, (bad, status, reply)
        assert isinstance(reply, dict) and reply.get("error_code") and len(reply.get("message", "")) > 10, reply

    # clean shutdown: SIGTERM to the server's group, the process ends, the port is free again
    process, port = state["process"], state["port"]
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode is not None
    deadline = time.monotonic() + 30
    while not port_is_free(port):
        assert time.monotonic() < deadline, f"port {port} still taken after the server ended"
        time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    deadline = time.monotonic() + 30
    while group_alive(process.pid):  # nothing of the group (mlflow, uvicorn and its worker) is left
        assert time.monotonic() < deadline, f"processes of group {process.pid} still running after the server ended"
        time.sleep(0.5)
