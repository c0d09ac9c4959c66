"""`python -m sft_pipeline.training` (also under `accelerate launch -m`): runs the CLI in cli.py."""

import sys

from sft_pipeline.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
