"""Loading a registered model back from a store (pyfunc or transformers) without touching global MLflow state."""

from __future__ import annotations

from sft_pipeline.tracking import use_tracking_uri


def load_registered_model(tracking_uri: str, model_uri: str, flavor: str = "pyfunc", **kwargs):
    """Load ``models:/<name>@<alias>`` (or any model URI) from this store without touching global MLflow state.

    flavor: "pyfunc" (``predict([...], params={...})``) or "transformers" (a pipeline, or
    components with ``return_type="components"``).
    """
    with use_tracking_uri(tracking_uri) as mlflow:
        if flavor == "pyfunc":
            return mlflow.pyfunc.load_model(model_uri, **kwargs)
        if flavor == "transformers":
            return mlflow.transformers.load_model(model_uri, **kwargs)
        raise ValueError(f"flavor must be 'pyfunc' or 'transformers', got {flavor!r}")
