"""Loaders that feed the training device from converted `.beton` files: one interface, four backends."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from beton_trainer.common.errors import UserError, did_you_mean

if TYPE_CHECKING:  # the converters import format.dataset without paying for torch
    from beton_trainer.pipelines.base import Loader, LoaderOptions

__all__ = ["BACKENDS", "build_loader"]

BACKENDS = {
    "tensor": ("beton_trainer.pipelines.tensor_loader", "TensorLoader", None),
    "ffcv": ("beton_trainer.pipelines.ffcv_loader", "FfcvLoader", "ffcv"),
    "dali": ("beton_trainer.pipelines.dali_loader", "DaliLoader", "nvidia.dali"),
    "photo": ("beton_trainer.pipelines.photo_loader", "PhotoLoader", None),
}

INSTALL_HINT = {
    "ffcv": "install it with `pip install .[ffcv]` (FFCV builds from source: it needs a C++ compiler, "
            "libopencv-dev and libturbojpeg0-dev)",
    "dali": "install it with `pip install .[dali-cu13]` (or .[dali-cu12])",
}


def _core_alternative(options: LoaderOptions) -> str:
    """The core backend for the data an optional one was asked to load: photo for photos of varied sizes (it decodes
    them with torchvision and Pillow), else tensor."""
    from beton_trainer.format.dataset import load_manifest
    from beton_trainer.pipelines.base import varied_sizes

    try:
        return "photo" if varied_sizes(load_manifest(options.data_dir)) else "tensor"
    except UserError:  # no readable dataset there: the core backend will say so itself
        return "tensor"


def build_loader(backend: str, options: LoaderOptions) -> Loader:
    """Build the named backend's loader for one split."""
    if backend not in BACKENDS:
        raise UserError(f"unknown loader '{backend}'{did_you_mean(backend, BACKENDS)}; "
                        f"choose one of {', '.join(BACKENDS)}")
    module_name, class_name, package = BACKENDS[backend]
    if package is not None:
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"loader '{backend}' needs the {package} package, which is not installed: "
                            f"{INSTALL_HINT[backend]}, or use --loader {_core_alternative(options)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(options)
