"""The import paths the Dagster layer, bench/ and older code use keep working after the split."""

def test_every_exported_name_imports():
    import sft_pipeline.evaluation as evaluation

    assert evaluation.__all__ and all(hasattr(evaluation, name) for name in evaluation.__all__)
    from sft_pipeline.evaluation import load_model_for_eval
    from sft_pipeline.modeling import load_model_for_eval as home

    assert load_model_for_eval is home


def test_importing_evaluation_pulls_no_dagster_or_mlflow():
    import subprocess
    import sys

    code = ("import sys, sft_pipeline.evaluation, sft_pipeline.modeling; "
            "print(sorted(m for m in ('dagster', 'mlflow', 'great_expectations', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
