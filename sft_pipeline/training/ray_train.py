"""launcher 'ray': the Ray job's driver starts a Ray Train `TorchTrainer` whose workers each run `train`.

The Ray job's entrypoint is the usual ``python -m sft_pipeline.training --config cfg.json --output-json
result.json`` (see launch.ray_job_params); with launcher 'ray' the CLI calls :func:`run_ray_training`
here, in the job's driver process, which:

1. joins the cluster (``ray.init()``: inside a Ray job the job's own cluster, by hand ``RAY_ADDRESS`` or a
   local one) and, when it has several nodes, refuses paths local to one machine (cluster.py);
2. runs ``TorchTrainer(num_workers=num_processes, use_gpu, resources_per_worker)``; Ray Train starts the
   workers, joins them in one torch process group (NCCL on GPUs, gloo on CPUs) and each calls
   :func:`train_worker`, i.e. the same :func:`sft_pipeline.training.train` a local run calls;
3. rank 0's log records travel back to the driver through a Ray queue and are logged there, so the
   CLI's Dagster Pipes handler forwards them as a local run's are; rank 0 writes the result JSON (in the
   output folder, on storage every node reaches), which the driver returns.

Ray is an optional dependency (``pip install 'sft_pipeline[ray]'``); nothing here imports it at module level.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from sft_pipeline.training.cluster import check_cluster_storage
from sft_pipeline.training.config import TrainingConfig
from sft_pipeline.training.distributed import world_rank
from sft_pipeline.training.records import TrainingResult

logger = logging.getLogger(__name__)

RAY_SUBDIR = "ray"


class _QueueLogHandler(logging.Handler):
    """In rank 0: puts (level, logger name, message) of a record on a Ray queue the driver drains.

    The records a local run shows: this package's (step lines, resume, warnings) and every warning; not the
    INFO chatter of the libraries that Ray's worker configures (bytecode dumps from the root logger, ...).
    """

    def __init__(self, queue):
        super().__init__(level=logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("ray", "dagster")) or (
            record.levelno < logging.WARNING and not record.name.startswith("sft_pipeline")
        ):
            return
        try:
            self.queue.put_nowait((record.levelno, record.name, record.getMessage()))
        except Exception:  # a lost log line must not stop training
            pass


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one data-parallel rank running `train`; rank 0 writes the result."""
    from sft_pipeline.training.trainer import train

    # Ray Train has joined the ranks in a process group already; accelerate only asks MASTER_ADDR of
    # multi-node CPU ranks (for a group it then does not create).
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = _QueueLogHandler(loop_config["log_queue"]) if world_rank() == 0 else None
    if handler is not None:
        root.addHandler(handler)
    result_path = Path(loop_config["result_path"])
    try:
        result = train(TrainingConfig.from_dict(loop_config["config"]))
    except Exception as exc:
        if world_rank() == 0:
            result_path.with_suffix(".error.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if handler is not None:
            root.removeHandler(handler)
    if world_rank() == 0:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict(), indent=2))
        tmp.replace(result_path)


def _drain(queue, stop: threading.Event) -> None:
    """Driver side: log every record rank 0 put on the queue (then the CLI's Pipes handler forwards it)."""
    from ray.util.queue import Empty

    while True:
        try:
            level, name, message = queue.get(timeout=0.5)
        except Empty:
            if stop.is_set():
                return
            continue
        except Exception:  # the queue actor is gone
            return
        logging.getLogger(name).log(level, message)


def resolve_use_gpu(cfg: TrainingConfig, cluster_resources: dict[str, float]) -> bool:
    """`use_gpu`, or (None) whether the cluster has a GPU for every worker."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return cluster_resources.get("GPU", 0) >= cfg.num_processes


def run_ray_training(cfg: TrainingConfig, result_path: str | Path) -> TrainingResult:
    """Run `cfg` on Ray Train's TorchTrainer with `num_processes` workers; the result rank 0 wrote."""
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue
    except ImportError as exc:
        raise RuntimeError("TrainingConfig.launcher: 'ray' needs Ray Train: pip install 'sft_pipeline[ray]'") from exc
    from sft_pipeline.training.fingerprint import training_fingerprint

    result_path = Path(result_path).resolve()
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    result_path.with_suffix(".error.txt").unlink(missing_ok=True)
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # rank 0's records come through the queue; the rest are in the workers' logs
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check_cluster_storage(cfg, len(nodes))
    use_gpu = resolve_use_gpu(cfg, ray.cluster_resources())
    storage = cfg.ray_storage_path or str(Path(cfg.output_dir).resolve() / RAY_SUBDIR)
    logger.info("Ray Train: %d workers (use_gpu=%s, resources per worker %s) on %d node(s), storage %s",
                cfg.num_processes, use_gpu, cfg.ray_resources_per_worker or "default", len(nodes), storage)
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(queue, stop), daemon=True)
    drainer.start()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "result_path": str(result_path), "log_queue": queue},
        scaling_config=ScalingConfig(num_workers=cfg.num_processes, use_gpu=use_gpu,
                                     resources_per_worker=cfg.ray_resources_per_worker or None),
        run_config=RunConfig(name=f"sft-{training_fingerprint(cfg)}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.ray_max_failures)),
    )
    try:
        trainer.fit()
    except Exception as exc:
        error = result_path.with_suffix(".error.txt")
        if error.is_file():  # rank 0's own one-line reason beats Ray's wrapped traceback
            raise RuntimeError(error.read_text()) from exc
        raise
    finally:
        stop.set()
        drainer.join(timeout=10)
        queue.shutdown(force=True)
    if not result_path.is_file():
        raise RuntimeError(f"Ray Train finished but rank 0 wrote no result at {result_path}: is output_dir on "
                           "storage the driver reaches?")
    record = json.loads(result_path.read_text())
    return TrainingResult(**record)
