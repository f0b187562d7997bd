"""Train an image classifier from a recipe: `accelerate launch train.py --recipe c10_finetune`.

The entry point only, for a checkout: the installed command is `beton-train` (the same code,
`beton_trainer.trainer.cli`).
"""

from beton_trainer.trainer.cli import run

if __name__ == "__main__":
    run()
