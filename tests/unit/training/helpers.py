"""Shared helpers of the training tests: the repository root, a tiny tokenized SFT dataset, a small config."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sft_pipeline.training import TrainingConfig

REPO = Path(__file__).resolve().parents[3]
# A training log line of one optimizer step ("step 3/10 train_loss=..."): group 1 the step, group 2 the total.
STEP_LINE = re.compile(r"step (\d+)/(\d+) .*train_loss=")


def subprocess_env(**extra: str) -> dict:
    """The environment of a training subprocess: offline, this checkout on the path, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO), **extra}

_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Write a short poem about the sea.", "The sea is wide and grey and calm."),
    ("Classify the sentiment: I love it.", "positive"),
    ("List three ideas for a birthday party.", "a picnic, a treasure hunt, a movie night"),
    ("Answer with a letter. A B C D", "Answer: B"),
    ("Extract the names of all people mentioned in the text.", "Paris"),
]


def write_tiny_sft_dataset(model_dir, out_dir, n_train: int = 24, n_val: int = 8, n_test: int = 4) -> Path:
    """Write {train,validation,test}.parquet in the tokenization-stage contract from the tiny tokenizer.

    Labels are -100 on the system/user turns and the assistant header, the token ids elsewhere.
    """
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def row(i: int) -> dict:
        prompt, answer = _PAIRS[i % len(_PAIRS)]
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"{prompt} ({i})"}]
        prefix = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = prefix + answer + "<|im_end|>\n"
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix_ids)] == prefix_ids
        labels = [-100] * len(prefix_ids) + ids[len(prefix_ids):]
        return {"id": f"row{i:04d}", "input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": labels, "length": len(ids)}

    start = 0
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        pd.DataFrame([row(start + i) for i in range(n)]).to_parquet(out_dir / f"{split}.parquet", index=False)
        start += n
    return out_dir


def make_cfg(tiny_model_dir, dataset_dir, out, **kw) -> TrainingConfig:
    """A 5-step fp32 LoRA run on the tiny model (overrides in `kw`).

    fp32 because these tests compare losses and gradients across batchings, ranks and resumes to 1e-5;
    bf16 (the default on CPUs that multiply it natively) is tested on its own.
    """
    base = dict(model_dir=str(tiny_model_dir), dataset_dir=str(dataset_dir), output_dir=str(out),
                max_steps=5, eval_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, bf16=False)
    base.update(kw)
    return TrainingConfig(**base)
