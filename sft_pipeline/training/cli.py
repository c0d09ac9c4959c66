"""The command line: `python -m sft_pipeline.training --config cfg.json [--output-json result.json]`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sft_pipeline.training.config import TrainingConfig
from sft_pipeline.training.distributed import world_rank
from sft_pipeline.training.pipes import PipesLogHandler, materialization_metadata, open_pipes
from sft_pipeline.training.trainer import train

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_pipeline.training", description="Fine-tune a base model on a pre-tokenized dataset.",
        epilog="Runs under `torchrun -m sft_pipeline.training ...` and `accelerate launch -m ...` too; with launcher "
               "'ray' it is the Ray job's driver and starts Ray Train workers. See docs/training.md, docs/scaling.md.",
    )
    parser.add_argument("--config", required=True, help="JSON file with TrainingConfig fields.")
    parser.add_argument("--output-json", help="Where to write the TrainingResult JSON (default: stdout only).")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainingConfig.from_json(ns.config)
    with open_pipes() as pipes:
        handler = None
        if pipes is not None:
            handler = PipesLogHandler(pipes)
            logging.getLogger().addHandler(handler)
        error_path = Path(ns.output_json).with_suffix(".error.txt") if ns.output_json else None
        if error_path is not None:
            error_path.unlink(missing_ok=True)
        try:
            if cfg.launcher == "ray":  # this process is the Ray job's driver; the workers run `train`
                from sft_pipeline.training.ray_train import run_ray_training

                result = run_ray_training(cfg, ns.output_json or Path(cfg.output_dir) / "training_result.json")
            else:
                result = train(cfg)
        except Exception as exc:
            # One readable line for whoever launched this process (the Dagster asset raises it).
            logger.error("training failed: %s: %s", type(exc).__name__, exc)
            if error_path is not None and world_rank() == 0:
                error_path.parent.mkdir(parents=True, exist_ok=True)
                error_path.write_text(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
        if world_rank() == 0:
            text = json.dumps(result.to_dict(), indent=2)
            if ns.output_json:
                Path(ns.output_json).parent.mkdir(parents=True, exist_ok=True)
                Path(ns.output_json).write_text(text)
            else:
                print(text)
            if pipes is not None:
                pipes.report_asset_materialization(metadata=materialization_metadata(result),
                                                   data_version=result.weights_hash)
    return 0
