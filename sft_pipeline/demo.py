"""`python -m sft_pipeline.demo` (what `make demo` runs): materialize the whole graph on the persistent
instance in DAGSTER_HOME, then print the verdict: base vs tuned on the held-out task with 95% intervals,
what the gate decided and why, what was registered, three held-out examples side by side, and where to look."""

import os
import sys
import textwrap
import time

import dagster as dg
import pandas as pd

from sft_pipeline.definitions import defs
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage
from sft_pipeline.evaluation.report import comparison_rows, gate_summary
from sft_pipeline.outputs import GENERATIONS_FILE

EXAMPLES = 3


def _value(value, ci=None, signed=False) -> str:
    if value is None:
        return "n/a"
    fmt = "+.3f" if signed else ".3f"
    text = format(float(value), fmt)
    return text + (f" [{format(float(ci[0]), fmt)}, {format(float(ci[1]), fmt)}]" if ci else "")


def comparison_lines(evaluation) -> list[str]:
    """Base vs tuned per metric with 95% intervals, as aligned text lines."""
    rows = comparison_rows(evaluation.comparison, evaluation.task, (evaluation.task or {}).get("primary_metric"),
                           evaluation.base, evaluation.tuned)
    lines = [f"  {'metric':<26}{'n':>5}  {'base [95% CI]':<24}{'tuned [95% CI]':<24}{'tuned - base [95% CI]':<27}p"]
    for row in rows:
        label = row["label"] + (" (primary)" if row.get("primary") else "")
        p = "n/a" if row.get("p_value") is None else f"{row['p_value']:.2g}"
        lines.append(f"  {label:<26}{row.get('n') or '':>5}  {_value(row.get('base'), row.get('base_ci')):<24}"
                     f"{_value(row.get('tuned'), row.get('tuned_ci')):<24}{_value(row.get('effect'), row.get('effect_ci'), True):<27}{p}")
    loss_base, loss_tuned = (evaluation.base.get("test") or {}).get("loss"), (evaluation.tuned.get("test") or {}).get("loss")
    if loss_base is not None and loss_tuned is not None:
        lines.append(f"  {'held-out loss':<26}{'':>5}  {loss_base:<24.4f}{loss_tuned:<24.4f}{loss_tuned - loss_base:+.4f}")
    return lines


def example_lines(evaluation, dataset) -> list[str]:
    """Three held-out rows of the primary task: the prompt, the reference, and both models' answers."""
    path = evaluation.file(GENERATIONS_FILE)
    if GENERATIONS_FILE not in evaluation.files or not path.is_file():
        return ["  (no generations: model_evaluation ran with generation off)"]
    generations = pd.read_parquet(path)
    structured = generations[generations["kind"] == "structured"]
    sample = (structured if len(structured) else generations).head(EXAMPLES)
    test = pd.read_parquet(dataset.files["test"], columns=["id", "messages"]).set_index("id")["messages"]
    lines = []
    for row in sample.itertuples():
        messages = list(test.get(row.id, []))
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        # The ticket itself is the last paragraph of the prompt (the instruction comes first).
        lines += [f"  - {textwrap.shorten(prompt.split(chr(10) * 2)[-1], 110)}",
                  f"      expected  {row.reference}",
                  f"      base      {textwrap.shorten(str(row.base_generation), 90) or '(empty)'}",
                  f"      tuned     {textwrap.shorten(str(row.tuned_generation), 90) or '(empty)'}"]
    return lines


def registration_line(registered) -> str:
    promotion = registered.promotion or {}
    if not registered.created:
        return (f"no new version: this model is already {registered.model_name} version {registered.version} "
                f"(same weights); aliases {', '.join(registered.aliases)}")
    promoted = "promoted to champion" if promotion.get("promoted") else f"not promoted ({promotion.get('reason', 'no attempt')})"
    return f"{registered.model_name} version {registered.version}, {promoted}; aliases {', '.join(registered.aliases)}"


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set; run `make demo`, which points it at dagster_home/.", file=sys.stderr)
        return 2
    start = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("sft_pipeline_job").execute_in_process(instance=instance, raise_on_error=False)
        minutes = (time.monotonic() - start) / 60
        if not result.success:
            failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            print(f"\nThe pipeline run {result.run_id} failed at {failed}. Open the Dagster UI (make ui) to read the logs.", file=sys.stderr)
            return 1
        # Each asset's hand-off, loaded the way a notebook user would (`defs.load_asset_value`).
        with defs.get_asset_value_loader(instance=instance) as loader:
            registered = loader.load_asset_value("registered_model")
            evaluation = loader.load_asset_value("model_evaluation")
            training = loader.load_asset_value("fine_tuned_model")
            dataset = loader.load_asset_value("sft_dataset")
    storage, tracking = PipelineStorage(), MlflowTracking()
    reused = " (reused the finished training)" if training.reused else ""
    print(f"\nsft_pipeline: every asset materialized in {minutes:.1f} min (Dagster run {result.run_id}).\n")
    print(f"Training: {training.method}, {training.global_step} steps, train loss {training.train_loss:.4f}{reused}\n")
    print("Held-out evaluation, base vs tuned (95% intervals; paired tests over the same rows and questions):")
    print("\n".join(comparison_lines(evaluation)))
    print(f"\n{gate_summary(evaluation.gate)}")
    for reason in evaluation.gate.get("reasons") or []:
        print(f"  - {reason}")
    print(f"Registered: {registration_line(registered)}")
    print(f"\nThree held-out examples, base vs tuned:\n" + "\n".join(example_lines(evaluation, dataset)))
    print("\nWhere to look:")
    print(f"  artifacts               {storage.root}")
    print(f"  Dagster UI              make ui        -> http://127.0.0.1:3000 (asset graph, run {result.run_id[:8]}, metadata)")
    print(f"  MLflow UI               make mlflow-ui -> http://127.0.0.1:5000 (tracking store {tracking.tracking_uri})")
    print(f"  the champion            mlflow.pyfunc.load_model(\"models:/{registered.model_name}@champion\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
