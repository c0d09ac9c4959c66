"""Mixing human and synthetic rows at a requested share."""

from __future__ import annotations

import pandas as pd
import pytest

from sft_pipeline import schema
from sft_pipeline.augmentation.mixing import mix_human_and_synthetic


def _rows(n: int, origin: str, tag: str) -> pd.DataFrame:
    return pd.DataFrame([
        schema.make_row([{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}], source=tag, origin=origin)
        for i in range(n)
    ])


def test_mix_human_and_synthetic_ratio():
    human, synthetic = _rows(30, "human", "h"), _rows(40, "synthetic", "s")
    mixed = mix_human_and_synthetic(human, synthetic, 0.25, seed=1)
    assert (mixed["origin"] == "human").sum() == 30 and (mixed["origin"] == "synthetic").sum() == 10
    assert mixed.attrs["mix"]["synthetic_ratio_achieved"] == 0.25
    picked = mixed[mixed["origin"] == "synthetic"]["id"].tolist()
    order = synthetic["id"].tolist()
    assert picked == sorted(picked, key=order.index)  # original order kept
    # Reproducible from the seed, different for another seed.
    assert mix_human_and_synthetic(human, synthetic, 0.25, seed=1)["id"].tolist() == mixed["id"].tolist()
    assert mix_human_and_synthetic(human, synthetic, 0.25, seed=2)["id"].tolist() != mixed["id"].tolist()
    assert (mix_human_and_synthetic(human, synthetic, 0.0, seed=1)["origin"] == "human").all()
    only = mix_human_and_synthetic(human, synthetic, 1.0, seed=1)
    assert len(only) == 40 and (only["origin"] == "synthetic").all()
    # Too few synthetic rows: all are used, no human row is dropped, the achieved share is reported.
    short = mix_human_and_synthetic(human, synthetic.iloc[:5], 0.5, seed=1)
    assert len(short) == 35 and short.attrs["mix"]["synthetic_ratio_achieved"] == pytest.approx(5 / 35)
    # A synthetic copy of a human row is dropped.
    dup = pd.concat([human.iloc[:1], synthetic.iloc[:3]], ignore_index=True)
    assert mix_human_and_synthetic(human, dup, 0.5, seed=0)["id"].is_unique
    empty = mix_human_and_synthetic(human, synthetic.iloc[:0], 0.5, seed=0)
    assert len(empty) == 30
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="synthetic_ratio"):
            mix_human_and_synthetic(human, synthetic, bad, seed=0)
