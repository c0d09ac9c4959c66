"""Mixing human and synthetic rows at a requested synthetic share, reproducibly from a seed."""

from __future__ import annotations

import math
import random

import pandas as pd


def mix_human_and_synthetic(human: pd.DataFrame, synthetic: pd.DataFrame, synthetic_ratio: float, seed: int) -> pd.DataFrame:
    """All human rows plus a seeded sample of synthetic rows, so synthetic rows make up `synthetic_ratio` of the result.

    `synthetic_ratio` is the synthetic share of the output, in [0, 1]: 0 keeps human rows only, 0.25 one
    synthetic row for every three human ones, 1 synthetic rows only. Human rows are never dropped for
    ratios below 1; with too few synthetic rows, all of them are used and the achieved share is lower
    (see `result.attrs["mix"]`). Synthetic rows whose id equals a human row's are dropped first. The
    sample is reproducible from `seed` and keeps the synthetic rows' original order.
    """
    ratio = float(synthetic_ratio)
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio!r}")
    human = human if human is not None else pd.DataFrame()
    synthetic = synthetic if synthetic is not None else pd.DataFrame()
    if len(synthetic) and len(human) and "id" in synthetic.columns and "id" in human.columns:
        synthetic = synthetic[~synthetic["id"].isin(set(human["id"]))]
    n_human, n_available = len(human), len(synthetic)
    if ratio >= 1.0:
        keep_human, wanted = 0, n_available
    else:
        keep_human = n_human
        # The largest s with s / (H + s) <= ratio (a tiny slack absorbs float error at exact ratios).
        wanted = math.floor(ratio * n_human / (1.0 - ratio) + 1e-9)
    n_syn = min(wanted, n_available)
    rng = random.Random(f"mix:{seed}")
    picked = sorted(rng.sample(range(n_available), n_syn))
    parts = [p for p in (human.iloc[:keep_human], synthetic.iloc[picked]) if len(p.columns)]
    mixed = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    total = keep_human + n_syn
    mixed.attrs["mix"] = {
        "human_rows": keep_human, "synthetic_rows": n_syn, "synthetic_available": n_available,
        "synthetic_requested": wanted, "synthetic_ratio_requested": ratio,
        "synthetic_ratio_achieved": (n_syn / total) if total else 0.0, "seed": seed,
    }
    return mixed


__all__ = ["mix_human_and_synthetic"]
