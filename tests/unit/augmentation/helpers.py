"""Shared test helpers for augmentation: the seed frame, a scripted teacher, a loopback OpenAI-compatible server."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd

from sft_pipeline import schema
from sft_pipeline.augmentation import SelfInstructConfig


SEEDS = [
    ("Write a short poem about the sea.", "The sea is wide and grey and calm."),
    ("What is the capital of France?", "Paris."),
    ("List three ideas for a birthday party.", "A picnic, a treasure hunt, a movie night."),
    ("Summarize the paragraph in one sentence.", "It is about cats."),
    ("Classify the sentiment of this review as positive or negative.", "Positive."),
]


def seed_frame(extra_synthetic: bool = True) -> pd.DataFrame:
    rows = [
        schema.make_row([{"role": "user", "content": p}, {"role": "assistant", "content": r}], source="seed")
        for p, r in SEEDS
    ]
    if extra_synthetic:
        # Not a seed (origin synthetic), but still part of the pool a candidate must differ from.
        rows.append(schema.make_row(
            [{"role": "user", "content": "Explain how rainbows form in the sky."}, {"role": "assistant", "content": "Light."}],
            source="old_synth", origin="synthetic",
        ))
    return pd.DataFrame(rows)


def prompt_kind(prompt: list[dict]) -> str:
    text = prompt[-1]["content"]
    if text.startswith("Here are some example tasks"):
        return "instruction"
    if "This is a classification task" in text:
        return "output_first"
    if "reply exactly <noinput>" in text:
        return "input"
    return "response"


class ScriptedTeacher:
    """Canned instruction replies in order; inputs, labels and answers from small rules or dicts."""

    name = "scripted"

    def __init__(self, instructions: list[str], answer: str | dict[str, str] = "A helpful, complete answer.",
                 inputs: dict[str, str] | None = None, fail_on_call: int | None = None) -> None:
        self.instructions = list(instructions)
        self.answer = answer
        self.inputs = inputs or {}
        self.fail_on_call = fail_on_call
        self.calls: list[dict] = []
        self._next = 0

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("teacher went away")
        kinds = [prompt_kind(p) for p in prompts]
        self.calls.append({"kinds": kinds, "n": len(prompts), "seed": seed, "prompts": prompts, "max_new_tokens": max_new_tokens})
        out = []
        for kind, p in zip(kinds, prompts):
            text = p[-1]["content"]
            if kind == "instruction":
                out.append(self.instructions[self._next % len(self.instructions)] if self.instructions else "")
                self._next += 1
            elif kind == "input":
                task = text.split("\n", 1)[0].removeprefix("Task: ")
                out.append(self.inputs.get(task, "<noinput>"))
            elif kind == "output_first":
                out.append("Class label: Positive\nInput: I loved every minute of this film.")
            elif isinstance(self.answer, dict):
                out.append(self.answer.get(text.split("\n\n")[0], "A helpful, complete answer."))
            else:
                out.append(self.answer)
        return out


NOVEL = [
    "1. Give three tips for staying healthy during winter.",
    "Task: Translate the sentence 'good morning' into Spanish.",
    "2) Explain the difference between a virus and a bacterium.",
    '"Suggest a name for a bakery that sells vegan cakes."',
    "Describe the water cycle for a ten year old student.",
    "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
    "Write a limerick about a forgetful robot.",
    "Name four planets and one fact about each.",
]


def small_cfg(**kw) -> SelfInstructConfig:
    base = dict(num_instructions=4, batch_size=2, max_attempts=30, new_tasks_per_prompt=1, seed_tasks_per_prompt=4,
                synthetic_tasks_per_prompt=1)
    base.update(kw)
    return SelfInstructConfig(**base)


class ChatServer:
    """A loopback OpenAI-compatible server: canned completions, scripted failures, request log."""

    def __init__(self, reply=None, fail_first: int = 0, fail_status: int = 503, delay_s: float = 0.0, slow_first: int = 0):
        self.reply = reply or (lambda body: f"echo: {body['messages'][-1]['content'][:40]}")
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay_s = delay_s
        self.slow_first = slow_first
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                self._counted_out = False
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if n < server.slow_first:
                        time.sleep(1.0)  # longer than the client's timeout
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    if n < server.fail_first:
                        return self._send(server.fail_status, {"error": {"message": "overloaded"}})
                    content = server.reply(body)
                    self._send(200, {"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}]})
                finally:
                    self._done()

            def _done(self):
                # Counted out before the response is written: once the client has it, it may send the next
                # request before this thread gets to run again, which is not a request in flight.
                with server.lock:
                    if getattr(self, "_counted_out", False):
                        return
                    self._counted_out = True
                    server.in_flight -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self._done()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def self_instruct_server_reply(body: dict) -> str:
    """A stand-in for a strong teacher: new tasks, inputs, labels and answers, deterministic in the seed."""
    text = body["messages"][-1]["content"]
    kind = prompt_kind(body["messages"])
    tasks = [
        "Explain how volcanoes form and why some erupt explosively.",
        "Write a polite email asking a landlord to fix a leaking tap.",
        "Classify this sentence as formal or informal.",
        "Give a step-by-step recipe for sourdough bread.",
        "Compare two popular chess openings for beginners.",
        "Summarize the main causes of the French Revolution.",
        "Categorize these fruits by colour: banana, cherry, lime.",
        "Suggest five names for a podcast about personal finance.",
        "Describe how compound interest grows savings over decades.",
        "Is this statement fact or opinion: jazz began in New Orleans.",
        "Translate a short greeting into Japanese and explain its politeness level.",
        "Draft a haiku about bird migration in autumn.",
    ]
    if kind == "instruction":
        a, b = random.Random(body["seed"]).sample(tasks, 2)
        return f"9. {a}\n10. {b}"
    if kind == "input":
        return "<noinput>"
    if kind == "output_first":
        return "Class label: formal\nInput: We kindly request your attendance."
    return f"Here is a careful answer to: {text[:60]}"
