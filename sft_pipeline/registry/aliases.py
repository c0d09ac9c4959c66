"""Aliases: gated compare-and-set promotion (champion), manual moves, and the alias history."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_pipeline.hashing import short, text_digest
from sft_pipeline.registry.tags import HISTORY_PREFIX, PROMOTION_PREFIX, SCORE_PREFIX
from sft_pipeline.tracking import _safe_name, _sqlite_path
from sft_pipeline.tracking import client as _client  # `client` is the local name for the instance


@dataclass
class PromotionDecision:
    """Whether a version took an alias (e.g. champion), and why."""

    alias: str
    version: int
    promoted: bool
    reason: str
    previous_version: int | None = None
    metric: str | None = None
    score: float | None = None
    previous_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



@contextlib.contextmanager
def registry_lock(tracking_uri: str, model_name: str):
    """An exclusive OS file lock for alias moves of `model_name` in this store.

    Beside the DB for a SQLite store; in the temp folder (keyed by URI) for a tracking server,
    which serializes the processes of one machine. Works across threads too (each holder opens
    the file anew, and ``flock`` locks belong to the open file). Across machines, serialize the
    `registered_model` step instead (the Dagster pool ``registry``).
    """
    if tracking_uri.startswith("sqlite:///"):
        db = _sqlite_path(tracking_uri).resolve()
        lock_path = db.with_name(f"{db.name}.{_safe_name(model_name)}.lock")
    else:
        digest = short(text_digest(f"{tracking_uri}|{model_name}"))
        lock_path = Path(tempfile.gettempdir()) / f"sft_pipeline-registry-{digest}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; the re-read after setting still guards
        fcntl = None
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _current_alias_version(client, model_name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(model_name, alias).version)
    except Exception:
        return None


def move_alias(tracking_uri: str, model_name: str, alias: str, version: int | str, *, reason: str, run_id: str | None = None) -> None:
    """Point `alias` at `version` and append the move to the alias history."""
    client = _client(tracking_uri)
    previous = _current_alias_version(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, str(version))
    _record_alias_move(client, model_name, alias, int(version), previous, reason, run_id)


def _record_alias_move(client, model_name, alias, version, previous, reason, run_id) -> None:
    entry = {"alias": alias, "version": int(version), "previous_version": previous, "reason": reason[:2000],
             "run_id": run_id, "timestamp_ms": int(time.time() * 1000)}
    key = f"{HISTORY_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(model_name, key, json.dumps(entry))


def alias_history(tracking_uri: str, model_name: str, alias: str | None = None) -> list[dict[str, Any]]:
    """Every alias move recorded for `model_name` (optionally one alias), oldest first.

    Each entry: alias, version, previous_version, reason, run_id, timestamp_ms.
    """
    tags = _client(tracking_uri).get_registered_model(model_name).tags
    entries = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(HISTORY_PREFIX)]
    return [e for e in entries if alias is None or e["alias"] == alias]


def _version_score(client, model_name: str, version: int, metric: str) -> float | None:
    """The version's finite score on `metric`, else None: NaN compares false both ways and an infinity
    beats everything, so either would decide a comparison it says nothing about."""
    mv = client.get_model_version(model_name, str(version))
    raw = mv.tags.get(f"{SCORE_PREFIX}{metric}")
    if raw is None and mv.run_id:
        raw = client.get_run(mv.run_id).data.metrics.get(metric)
    try:
        value = float(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _gate_verdict_is_pass(gate_passed: Any) -> bool:
    # Only a real True passes: a verdict read back from a tag ("False") or a NaN metric is truthy.
    import numpy as np

    return isinstance(gate_passed, (bool, np.bool_)) and bool(gate_passed)


def _beats(score: float | None, other: float | None, higher_is_better: bool) -> bool:
    if score is None:
        return False
    if other is None:
        return True
    return score > other if higher_is_better else score < other


def promote_if_better(
    tracking_uri: str,
    model_name: str,
    version: int | str,
    *,
    alias: str = "champion",
    metric: str | None = None,
    higher_is_better: bool = True,
    gate_passed: bool = True,
    gate_reasons: list[str] | None = None,
    run_id: str | None = None,
    max_attempts: int = 3,
) -> PromotionDecision:
    """Compare-and-set: move `alias` to `version` only if the gate passed and it beats the holder.

    Beating means a strictly better `metric` (a ``score.<metric>`` version tag, else the run's
    metric); a NaN or infinite score counts as no score: a version without one is never promoted,
    a holder without one is beaten by any scored version; with `metric` None the gate alone
    decides. Only a boolean True `gate_passed` lets the comparison happen at all. Under
    `registry_lock` the holder is read, compared, the alias set and read back; if another writer
    moved it in between, the comparison is redone (at most `max_attempts` times). The decision and its reason are tagged on the version
    (``sft_pipeline.promotion.<alias>``, ``...reason``) and every move lands in the alias history.
    """
    return _decide_promotion(tracking_uri, model_name, int(version), alias, metric, higher_is_better,
                             gate_passed, gate_reasons, run_id, max_attempts=max_attempts)


def _decide_promotion(tracking_uri, model_name, version, alias, metric, higher_is_better, gate_passed,
                      gate_reasons, run_id, max_attempts: int = 3) -> PromotionDecision:
    client = _client(tracking_uri)
    version = int(version)
    score = _version_score(client, model_name, version, metric) if metric else None
    decision: PromotionDecision | None = None
    if not _gate_verdict_is_pass(gate_passed):
        reasons = "; ".join(gate_reasons or []) or f"the evaluation gate did not pass (verdict {gate_passed!r})"
        decision = PromotionDecision(alias, version, False, f"gate failed: {reasons}", metric=metric, score=score,
                                     previous_version=_current_alias_version(client, model_name, alias))
    elif metric and score is None:
        decision = PromotionDecision(alias, version, False, f"version {version} has no finite score for {metric!r}",
                                     metric=metric, previous_version=_current_alias_version(client, model_name, alias))
    attempt = 0
    while decision is None:
        attempt += 1
        with registry_lock(tracking_uri, model_name):
            holder = _current_alias_version(client, model_name, alias)
            holder_score = _version_score(client, model_name, holder, metric) if (metric and holder is not None) else None
            if holder == version:
                decision = PromotionDecision(alias, version, True, f"version {version} already holds {alias!r}",
                                             previous_version=holder, metric=metric, score=score, previous_score=holder_score)
                break
            if metric and holder is not None and not _beats(score, holder_score, higher_is_better):
                direction = "higher" if higher_is_better else "lower"
                decision = PromotionDecision(
                    alias, version, False,
                    f"{metric} {score:.6g} does not beat {alias} version {holder} ({holder_score}); {direction} is better",
                    previous_version=holder, metric=metric, score=score, previous_score=holder_score)
                break
            client.set_registered_model_alias(model_name, alias, str(version))
            now_holder = _current_alias_version(client, model_name, alias)
            if now_holder == version:
                if holder is None:
                    why = f"gate passed; first {alias}"
                elif metric:
                    why = f"gate passed; {metric} {score:.6g} beats version {holder} ({holder_score})"
                else:
                    why = "gate passed (no comparison metric configured)"
                _record_alias_move(client, model_name, alias, version, holder, why, run_id)
                decision = PromotionDecision(alias, version, True, why, previous_version=holder, metric=metric,
                                             score=score, previous_score=holder_score)
                break
        if attempt >= max_attempts:  # someone outside the lock keeps moving it: give up, say so
            decision = PromotionDecision(alias, version, False,
                                         f"{alias} was moved concurrently {attempt} times; left at version {now_holder}",
                                         previous_version=now_holder, metric=metric, score=score)
    client.set_model_version_tag(model_name, str(version), f"{PROMOTION_PREFIX}{alias}", "promoted" if decision.promoted else "kept")
    client.set_model_version_tag(model_name, str(version), f"{PROMOTION_PREFIX}{alias}.reason", decision.reason[:4900])
    return decision


def get_model_version_by_alias(tracking_uri: str, model_name: str, alias: str):
    """The `mlflow.entities.model_registry.ModelVersion` that `alias` points to (raises if none)."""
    return _client(tracking_uri).get_model_version_by_alias(model_name, alias)


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int | str, reason: str = "set by hand") -> None:
    """Point `alias` at `version` unconditionally (an operator's rollback); recorded in the alias history."""
    with registry_lock(tracking_uri, model_name):
        move_alias(tracking_uri, model_name, alias, version, reason=reason)
