"""`python -m sft_pipeline.demo` (what `make demo` runs): materialize the whole graph on the
persistent instance in DAGSTER_HOME, then print where to look at the results."""

import json
import os
import sys
import time

import dagster as dg

from sft_pipeline.definitions import defs
from sft_pipeline.defs.resources import MlflowTracking, PipelineStorage


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
        loader = defs.get_asset_value_loader(instance=instance)
        with loader:
            registered = loader.load_asset_value("registered_model")
            evaluation = loader.load_asset_value("model_evaluation")
            training = loader.load_asset_value("fine_tuned_model")
    storage, tracking = PipelineStorage(), MlflowTracking()
    print(f"\nsft_pipeline: every asset materialized in {minutes:.1f} min (Dagster run {result.run_id}).\n")
    print(f"  train loss              {training.train_loss:.4f} after {training.global_step} steps")
    print(f"  MMLU accuracy           base {evaluation.comparison['base_accuracy']:.3f} -> tuned {evaluation.comparison['tuned_accuracy']:.3f}")
    test = evaluation.tuned.get("test") or {}
    if test.get("loss") is not None:
        print(f"  held-out test loss      base {evaluation.base['test']['loss']:.4f} -> tuned {test['loss']:.4f}")
    print(f"  gate                    {'passed' if evaluation.gate_passed else 'failed: ' + '; '.join(evaluation.gate['reasons'])}")
    print(f"  registered model        {registered.model_name} version {registered.version}, aliases {json.dumps(registered.aliases)}")
    print("\nWhere to look:")
    print(f"  artifacts               {storage.root}")
    print(f"  Dagster UI              make ui        -> http://127.0.0.1:3000 (asset graph, run {result.run_id[:8]}, metadata)")
    print(f"  MLflow UI               make mlflow-ui -> http://127.0.0.1:5000 (tracking store {tracking.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
