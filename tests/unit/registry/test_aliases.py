"""Aliases: alias history, gated compare-and-set promotion under concurrency, lower-is-better, ties, manual rollback."""

from __future__ import annotations

import threading

from sft_pipeline.registry import alias_history, get_model_version_by_alias, promote_if_better, set_alias
from tests.unit.registry.helpers import bare_versions


def test_alias_history_records_every_move(registered):
    uri, *_ = registered
    history = alias_history(uri, "tiny-sft")
    assert [(h["alias"], h["version"]) for h in history] == [
        ("candidate", 1), ("champion", 1), ("candidate", 2), ("candidate", 3),
    ]
    assert history[2]["previous_version"] == 1
    assert [h["version"] for h in alias_history(uri, "tiny-sft", "champion")] == [1]


def test_two_concurrent_promotions_cannot_both_take_champion(store):
    uri, _ = store
    bare_versions(uri, "race", [0.5, 0.6, 0.7, 0.4, 0.55, 0.9, 0.8])
    promote_if_better(uri, "race", 1, metric="acc")
    # 0.6 vs 0.7: the better takes it; 0.4 vs 0.55: neither beats 0.7; 0.9 vs 0.8: the better takes it.
    for pair, expected in (((2, 3), 3), ((4, 5), 3), ((6, 7), 6)):
        barrier = threading.Barrier(2)
        decisions = {}

        def promote(version):
            barrier.wait()
            decisions[version] = promote_if_better(uri, "race", version, metric="acc")

        threads = [threading.Thread(target=promote, args=(v,)) for v in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert int(get_model_version_by_alias(uri, "race", "champion").version) == expected, decisions
        for version, decision in decisions.items():
            if version == expected or version not in pair:
                continue
            if decision.promoted:  # it went first and was then beaten by the better one
                assert [h["version"] for h in alias_history(uri, "race", "champion")][-2:] == [version, expected]
            else:
                assert "does not beat" in decision.reason, decision
    champion_moves = [h["version"] for h in alias_history(uri, "race", "champion")]
    assert champion_moves[0] == 1 and champion_moves[-1] == 6
    scores = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.4, 5: 0.55, 6: 0.9, 7: 0.8}
    assert all(scores[b] > scores[a] for a, b in zip(champion_moves, champion_moves[1:]))  # monotone


def test_lower_is_better_ties_and_manual_rollback(store):
    uri, _ = store
    bare_versions(uri, "loss", [1.0, 1.0, 0.8])
    assert promote_if_better(uri, "loss", 1, metric="acc", higher_is_better=False).promoted
    tie = promote_if_better(uri, "loss", 2, metric="acc", higher_is_better=False)
    assert not tie.promoted and "lower is better" in tie.reason  # a tie does not beat
    assert promote_if_better(uri, "loss", 3, metric="acc", higher_is_better=False).promoted
    set_alias(uri, "loss", "champion", 1, reason="rollback: bad outputs in production")
    assert int(get_model_version_by_alias(uri, "loss", "champion").version) == 1
    assert alias_history(uri, "loss", "champion")[-1]["reason"].startswith("rollback")
    missing = promote_if_better(uri, "loss", 3, metric="f1")
    assert not missing.promoted and "no finite score" in missing.reason


def test_a_nan_or_infinite_score_never_wins_a_promotion(store):
    uri, _ = store
    nan, inf = float("nan"), float("inf")
    bare_versions(uri, "nan-scores", [nan, 0.5, nan, inf, 0.6])
    first = promote_if_better(uri, "nan-scores", 1, metric="acc")
    assert not first.promoted and "no finite score" in first.reason
    assert alias_history(uri, "nan-scores", "champion") == []
    assert promote_if_better(uri, "nan-scores", 2, metric="acc").promoted
    for version in (3, 4):  # NaN compares false both ways and inf beats everything: neither may take it
        decision = promote_if_better(uri, "nan-scores", version, metric="acc")
        assert not decision.promoted and "no finite score" in decision.reason, decision
    assert int(get_model_version_by_alias(uri, "nan-scores", "champion").version) == 2
    assert promote_if_better(uri, "nan-scores", 5, metric="acc").promoted  # an honest, better score still wins


def test_a_nan_champion_is_beaten_by_any_finite_score(store):
    uri, _ = store
    bare_versions(uri, "nan-holder", [float("nan"), 0.1])
    set_alias(uri, "nan-holder", "champion", 1, reason="set by hand before scores were checked")
    decision = promote_if_better(uri, "nan-holder", 2, metric="acc", higher_is_better=False)
    assert decision.promoted and decision.previous_version == 1 and decision.previous_score is None, decision


def test_no_promotion_unless_the_gate_verdict_is_true(store):
    uri, _ = store
    bare_versions(uri, "gated", [0.9, 0.95])
    for verdict in (False, None, "False", "false", 0, 1, float("nan"), "True"):
        decision = promote_if_better(uri, "gated", 1, metric="acc", gate_passed=verdict, gate_reasons=["held-out test loss is missing"])
        assert not decision.promoted and decision.reason.startswith("gate failed"), (verdict, decision)
    assert alias_history(uri, "gated", "champion") == []
    failed = promote_if_better(uri, "gated", 1, metric="acc", gate_passed=False, gate_reasons=["held-out test loss is missing"])
    assert failed.reason == "gate failed: held-out test loss is missing"
    assert promote_if_better(uri, "gated", 2, metric="acc", gate_passed=True).promoted
