"""beton-trainer: a high-throughput image-classification trainer fed from verified `.beton` files.

What a notebook or script needs, importable from here (each name is loaded on first use, so
`import beton_trainer` stays light):

    from beton_trainer import Trainer, convert_dataset
    convert_dataset("mnist", src="data/raw/mnist", out="data")
    result = Trainer("mnist_cnn", data="data/mnist", callbacks=[...]).fit()

The commands `beton-train`, `beton-convert` and `beton-studies` are the same code from the shell.

One installed package: its subpackages are `common` (errors, files, schemas), `format` (the `.beton` reader
and writer, manifests, splits), `convert`, `pipelines` and `models` (each importing only the layers below),
`trainer` (the loop, its callbacks, the Python API and the command line) and `studies`. In a built wheel they
sit inside this folder; in a source checkout they are the repository's top-level folders, which
pyproject.toml's `package-dir` maps into this package, so that the repository keeps the layout it was
specified with.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_here = Path(__file__).resolve().parent
if not (_here / "trainer").is_dir() and (_here.parent / "trainer" / "loop.py").is_file():
    __path__.append(str(_here.parent))  # a source checkout (editable install or none): see the docstring

_EXPORTS = {  # name -> "module" (or "module:attribute" where the name differs there)
    # the Python API
    "Trainer": "beton_trainer.trainer.api",
    "FitResult": "beton_trainer.trainer.api",
    "Prediction": "beton_trainer.trainer.api",
    "load_run": "beton_trainer.trainer.api",
    "Callback": "beton_trainer.trainer.callbacks",
    "Run": "beton_trainer.trainer.state",
    "RunOptions": "beton_trainer.trainer.state",
    "train": "beton_trainer.trainer.loop",
    # recipes
    "Recipe": "beton_trainer.trainer.config",
    "load_recipe": "beton_trainer.trainer.config",
    "list_recipes": "beton_trainer.trainer.config",
    # data
    "convert_dataset": "beton_trainer.convert",
    "build_loader": "beton_trainer.pipelines",
    "LoaderOptions": "beton_trainer.pipelines.base",
    "AugmentSpec": "beton_trainer.pipelines.augment",
    "load_manifest": "beton_trainer.format",
    "open_split": "beton_trainer.format",
    # models
    "build_model": "beton_trainer.models",
    "list_models": "beton_trainer.models",
    "register_model": "beton_trainer.models:register",
    # errors
    "UserError": "beton_trainer.common.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'beton_trainer' has no attribute '{name}'")
    module, _, attribute = where.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
