"""The MLflow run of one training: params, live metrics, dataset inputs, artifacts; continued on resume."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

from sft_pipeline import tracking
from sft_pipeline.hashing import short
from sft_pipeline.training.config import TrainingConfig
from sft_pipeline.training.data import num_rows
from sft_pipeline.training.records import MLFLOW_RUN_FILE, is_number

logger = logging.getLogger(__name__)


class MlflowRun:
    """One MLflow run per training, driven through MlflowClient (never touches a caller's fluent run).

    The run id is remembered in ``output_dir/mlflow_run.json``; a resumed training continues the
    same run, so its metric history spans the interruption.
    """

    def __init__(self, cfg: TrainingConfig, fingerprint: str, resuming: bool):
        self.client = tracking.client(cfg.mlflow_tracking_uri)
        self.resumed = False
        tags = {"sft_pipeline.stage": "training", "sft_pipeline.method": cfg.method,
                "sft_pipeline.training_fingerprint": fingerprint, **cfg.mlflow_tags}
        state_file = Path(cfg.output_dir) / MLFLOW_RUN_FILE
        run_id = self._previous_run(state_file, cfg.mlflow_tracking_uri) if resuming else None
        if run_id:
            self.run_id = run_id
            self.resumed = True
            self.client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        else:
            self.run_id = tracking.start_run(cfg.mlflow_tracking_uri, cfg.mlflow_experiment,
                                             run_name=cfg.mlflow_run_name, tags=tags)
            state_file.write_text(json.dumps({"tracking_uri": cfg.mlflow_tracking_uri, "run_id": self.run_id}))
        params = {k: v for k, v in cfg.to_dict().items() if k not in ("mlflow_tags", "mlflow_run_name", "resume")}
        params["training_fingerprint"] = fingerprint
        self.log_params(params)

    def _previous_run(self, state_file: Path, uri: str) -> str | None:
        try:
            saved = json.loads(state_file.read_text())
            if saved.get("tracking_uri") != uri:
                return None
            run = self.client.get_run(saved["run_id"])
            return run.info.run_id if run.info.lifecycle_stage == "active" else None
        except Exception:  # no file, another store, a deleted run: start a new MLflow run
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # Params are immutable in MLflow: on resume log only the ones the run lacks.
        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        if items:
            self.client.log_batch(self.run_id, params=items, synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if is_number(v) and math.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items, synchronous=True)

    def log_dataset_inputs(self, dataset_dir: str | Path, digest: str) -> None:
        """Record train/validation Parquet as mlflow.data dataset inputs (name, digest, source, schema)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        if self.resumed:
            return
        inputs = []
        for split in ("train", "validation"):
            path = Path(dataset_dir) / f"{split}.parquet"
            if not path.is_file() or num_rows(path) == 0:
                continue
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            columns = [c for c in ("id", "length") if c in names] or ["input_ids"]
            frame = pd.read_parquet(path, columns=columns)
            with warnings.catch_warnings():  # mlflow's hints about int columns and source types are noise here
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=f"sft_dataset_{split}",
                                             digest=f"{short(digest, 8)}-{split}")
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def end(self, status: str, artifacts: list[Path] = ()) -> None:
        for path in artifacts:
            try:
                self.client.log_artifact(self.run_id, str(path))
            except Exception:  # an artifact store hiccup must not lose the trained model
                logger.exception("could not log %s to MLflow", path)
        self.client.set_terminated(self.run_id, status=status)
