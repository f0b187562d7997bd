"""Train an image classifier from a recipe: `accelerate launch train.py --recipe c10_finetune`.

The entry point only: the command line is `trainer/cli.py`, the loop `trainer/loop.py`.
"""

import sys

from common.errors import run_cli
from trainer.cli import main

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
