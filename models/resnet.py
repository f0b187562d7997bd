"""torchvision ResNets adapted to 32x32 images: `resnet18_cifar` and `resnet34_cifar`.

The model is a plain torchvision `ResNet` (no wrapper), so its state dict loads into
`torchvision.models.resnet34()` changed the same way: a 3x3 stride-1 `conv1` for C input channels,
no stem max-pool, and `fc = Sequential(Dropout(p), Linear(512, num_classes))`.

`pretrained` starts from ImageNet weights: `true` downloads torchvision's IMAGENET1K_V1 (or uses the
torch hub cache), a string is the path of a torchvision-format state dict (for offline machines).
Every tensor whose name and shape match is copied; only the replaced layers (conv1, fc) stay fresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from common.errors import UserError
from common.schema import check_range
from models.registry import ImageShape, register, require_min_side

log = logging.getLogger(__name__)

REPLACED_PREFIXES = ("conv1.", "fc.")  # layers that differ from the ImageNet model and train from scratch


@dataclass
class ResNetOptions:
    dropout: float = 0.2
    pretrained: bool | str = False  # true: ImageNet weights via torchvision; a string: PATH to a state dict

    def __post_init__(self) -> None:
        check_range("dropout", self.dropout, 0, 1)


@dataclass(frozen=True)
class PretrainedReport:
    """What `load_pretrained` did, for the training log."""

    source: str
    loaded: int  # tensors copied from the source
    skipped: list[str]  # source tensors not used: exactly the replaced layers

    def __str__(self) -> str:
        return (f"pretrained weights from {self.source}: loaded {self.loaded} tensors, "
                f"skipped {len(self.skipped)} (replaced layers): {', '.join(self.skipped)}")


def _download_imagenet(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except OSError:
        raise UserError(f"could not download ImageNet weights for {arch} (offline?): pass "
                        "--set model.pretrained=PATH to a torchvision state dict, "
                        "or --set model.pretrained=false") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    fix = "pass a file saved with torch.save(torchvision.models.<arch>().state_dict(), PATH)"
    if not path.is_file():
        raise UserError(f"pretrained weights file '{path}' not found; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file it cannot read
        raise UserError(f"could not read '{path}' as a PyTorch state dict ({exc}); {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' does not hold a state dict (name -> tensor); {fix}")
    return state


def load_pretrained(model: nn.Module, source: bool | str | Path, arch: str) -> PretrainedReport:
    """Copy ImageNet `arch` weights (`True`: download, else a file path) into `model`, except the replaced layers.

    Raises UserError when the source is not a torchvision `arch` state dict, i.e. when anything other
    than the replaced layers would be left unmatched (e.g. resnet18 weights for resnet34).
    """
    label = f"torchvision {arch} IMAGENET1K_V1" if source is True else str(source)
    state = _download_imagenet(arch) if source is True else _read_state_dict(Path(source))
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(matched))
    missing = sorted(k for k in own if k not in matched and not k.startswith(REPLACED_PREFIXES))
    unexpected = [k for k in skipped if not k.startswith(REPLACED_PREFIXES)]
    if missing or unexpected:
        raise UserError(f"pretrained weights {label} do not fit {arch}: {len(missing)} model tensors without a match "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unusable file tensors (e.g. {unexpected[:3]}); "
                        f"pass a state dict of torchvision.models.{arch}()")
    model.load_state_dict(matched, strict=False)
    return PretrainedReport(label, len(matched), skipped)


def _cifar_resnet(arch: str, num_classes: int, image_shape: ImageShape, opts: ResNetOptions) -> nn.Module:
    require_min_side(image_shape, 8, arch, "use a larger image size")
    model = getattr(torchvision.models, arch)()
    model.conv1 = nn.Conv2d(image_shape[2], 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Identity()
    model.fc = nn.Sequential(nn.Dropout(opts.dropout), nn.Linear(512, num_classes))
    if opts.pretrained is not False:
        log.info("%s", load_pretrained(model, opts.pretrained, arch))
    return model


@register("resnet18_cifar", options=ResNetOptions, head="fc")
def resnet18_cifar(num_classes: int, image_shape: ImageShape, opts: ResNetOptions) -> nn.Module:
    return _cifar_resnet("resnet18", num_classes, image_shape, opts)


@register("resnet34_cifar", options=ResNetOptions, head="fc")
def resnet34_cifar(num_classes: int, image_shape: ImageShape, opts: ResNetOptions) -> nn.Module:
    return _cifar_resnet("resnet34", num_classes, image_shape, opts)
