"""The import paths the Dagster layer, bench/ and older code use keep working after the split."""

import hashlib


def test_every_exported_name_imports():
    import sft_pipeline.benchmark as benchmark
    import sft_pipeline.evaluation as evaluation
    from sft_pipeline.evaluation import mmlu

    for module in (evaluation, benchmark):
        assert module.__all__ and all(hasattr(module, name) for name in module.__all__)
    assert benchmark.load_mmlu is mmlu.load_mmlu and benchmark.select_fewshot_examples is mmlu.select_fewshot_examples
    from sft_pipeline.evaluation import load_model_for_eval
    from sft_pipeline.modeling import load_model_for_eval as home

    assert load_model_for_eval is home


def test_file_digest_is_the_old_concatenated_16_hex(tmp_path):
    from sft_pipeline.evaluation import file_digest

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"hello ")
    b.write_bytes(b"world")
    assert file_digest(a, b) == hashlib.sha256(b"hello world").hexdigest()[:16]
    assert file_digest(a) == hashlib.sha256(b"hello ").hexdigest()[:16]


def test_importing_evaluation_pulls_no_dagster_or_mlflow():
    import subprocess
    import sys

    code = ("import sys, sft_pipeline.evaluation, sft_pipeline.modeling, sft_pipeline.benchmark; "
            "print(sorted(m for m in ('dagster', 'mlflow', 'great_expectations', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
