"""Model registry: `build_model(name, num_classes=, image_shape=, **kwargs)` for every trainable net.

Importing the model modules registers them; `timm:<name>` reaches any timm architecture.
"""

from beton_trainer.models import cnn, mlp, resnet, timm_models  # noqa: F401  (importing registers the models)
from beton_trainer.models.registry import (
    build_model,
    count_parameters,
    head_module_name,
    list_models,
    model_summary,
    register,
    register_family,
)
from beton_trainer.models.resnet import PretrainedReport, load_pretrained

__all__ = [
    "PretrainedReport",
    "build_model",
    "count_parameters",
    "head_module_name",
    "list_models",
    "load_pretrained",
    "model_summary",
    "register",
    "register_family",
]
