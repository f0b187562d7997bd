"""`python -m beton_trainer.studies` (and `python -m studies` in a checkout): the `beton-studies` command."""

from beton_trainer.studies.cli import run

run()
