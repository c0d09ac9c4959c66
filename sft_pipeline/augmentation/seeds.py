"""The seed pool read from canonical rows, and the example tasks sampled from it for each prompt."""

from __future__ import annotations

import random

import pandas as pd

from sft_pipeline import schema


def seed_pool(seed_rows: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str]]:
    """(human seeds as (id, instruction), every existing instruction text)."""
    if seed_rows is None or len(seed_rows) == 0:
        return [], []
    if "origin" not in seed_rows.columns:
        raise ValueError("seed_rows needs an 'origin' column (human seeds are rows with origin == 'human')")
    if "prompt" in seed_rows.columns:
        prompts = seed_rows["prompt"].astype(str).tolist()
    elif "messages" in seed_rows.columns:
        prompts = [schema.flatten_turns(m, "user") for m in seed_rows["messages"]]
    else:
        raise ValueError("seed_rows needs a 'prompt' (or 'messages') column")
    if "id" in seed_rows.columns:
        ids = seed_rows["id"].astype(str).tolist()
    else:
        ids = [schema.conversation_id(m) for m in seed_rows["messages"]]
    origins = seed_rows["origin"].tolist()
    seeds = [(i, p) for i, p, o in zip(ids, prompts, origins) if o == "human" and p.strip()]
    return seeds, [p for p in prompts if p.strip()]


def sample_examples(
    rng: random.Random, seeds: list[tuple[str, str]], synthetic: list[tuple[str, str]], k: int, n_synthetic: int
) -> list[tuple[str, str]]:
    """`k` example tasks for one prompt: up to `n_synthetic` earlier synthetic tasks, human seeds for the rest, shuffled."""
    # Self-Instruct shows 8 tasks: 6 human seeds and 2 earlier machine-made ones (once there are any).
    n_syn = min(len(synthetic), n_synthetic)
    n_hum = min(len(seeds), k - n_syn)
    picked = rng.sample(seeds, n_hum) + rng.sample(synthetic, n_syn)
    rng.shuffle(picked)
    return picked


__all__ = ["seed_pool", "sample_examples"]
