"""Sample records of every input shape and a JSONL writer, shared by the ingest tests."""

import json


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


ALPACA = {"instruction": "Name a prime number.", "input": "", "output": "Seven is prime.", "category": "open_qa"}
DOLLY = {"instruction": "Who wrote it?", "context": "The memo was written by Ana.", "response": "Ana wrote it.", "category": "closed_qa"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
MESSAGES = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
PROMPT_COMPLETION = {"prompt": "Translate 'gato' to English.", "completion": "cat"}
