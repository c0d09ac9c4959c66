"""Tests for sft_pipeline.tokenization.fingerprint: what changes the key and what does not."""

from __future__ import annotations

from sft_pipeline.tokenization.config import TokenizationConfig
from sft_pipeline.tokenization.fingerprint import fingerprint
from tests.unit.tokenization.samples import make_rows


def test_fingerprint(tiny_model_dir):
    ids = list(make_rows(10)["id"])
    cfg = TokenizationConfig()
    fp = fingerprint(ids, tiny_model_dir, cfg)
    assert fp == fingerprint(list(reversed(ids)), tiny_model_dir, TokenizationConfig())
    assert fp != fingerprint(ids[:-1], tiny_model_dir, cfg)
    assert fp != fingerprint(ids, tiny_model_dir, TokenizationConfig(max_length=512))
    assert fp != fingerprint(ids, tiny_model_dir, TokenizationConfig(template="alpaca"))
