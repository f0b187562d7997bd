"""`python -m beton_trainer.convert` (and `python -m convert` in a checkout): the `beton-convert` command."""

from beton_trainer.convert.cli import run

run()
