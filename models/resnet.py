"""torchvision ResNets: `resnet18_cifar` and `resnet34_cifar` adapted to 32x32 images, and `resnet18` /
`resnet50` in the ImageNet layout (7x7 stride-2 stem and max-pool) for photos.

The CIFAR models are plain torchvision `ResNet`s (no wrapper), so their state dicts load into
`torchvision.models.resnet34()` changed the same way: a 3x3 stride-1 `conv1` for C input channels,
no stem max-pool, and `fc = Sequential(Dropout(p), Linear(512, num_classes))`. The ImageNet-layout
models are torchvision's own with `fc` sized for the classes (and `conv1` replaced for C != 3), with
optional BlurPool as in ffcv-imagenet; their state dicts keep torchvision's keys either way.

`pretrained` starts from ImageNet weights: `true` downloads torchvision's IMAGENET1K_V1 (or uses the
torch hub cache), a string is the path of a torchvision-format state dict (for offline machines).
Every tensor whose name and shape match is copied; only the replaced layers (conv1, fc) stay fresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.common.schema import check_range
from beton_trainer.models.registry import ImageShape, register, require_min_side

__all__ = ["BlurPoolConv2d", "PretrainedReport", "load_pretrained"]

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


@dataclass
class ImageNetResNetOptions:
    blurpool: bool = False  # low-pass filter before every strided conv (ffcv-imagenet's use_blurpool)
    pretrained: bool | str = False  # true: ImageNet weights via torchvision; a string: PATH to a state dict


class BlurPoolConv2d(nn.Conv2d):
    """A strided conv that first blurs its input with a 3x3 binomial filter (Zhang 2019, "Making
    convolutional networks shift-invariant again"), as ffcv-imagenet's BlurPoolConv2d. Unlike that wrapper
    it subclasses Conv2d and keeps the filter out of the state dict, so weights stay torchvision's."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        binomial = torch.tensor([1.0, 2.0, 1.0])
        kernel = (binomial[:, None] * binomial[None, :] / 16).expand(conv.in_channels, 1, 3, 3)
        self.register_buffer("blur_filter", kernel.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.conv2d(x, self.blur_filter, padding=1, groups=self.in_channels))


def add_blurpool(module: nn.Module) -> None:
    """Replace, in place, every conv with stride > 1 and at least 16 input channels (ffcv-imagenet's rule:
    not the stem, which sees the raw image) by its BlurPool version."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            add_blurpool(child)


def _imagenet_resnet(arch: str, num_classes: int, image_shape: ImageShape, opts: ImageNetResNetOptions) -> nn.Module:
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if image_shape[2] != 3:
        model.conv1 = nn.Conv2d(image_shape[2], 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if opts.pretrained is not False:
        log.info("%s", load_pretrained(model, opts.pretrained, arch))
    if opts.blurpool:
        add_blurpool(model)
    return model


@register("resnet18", options=ImageNetResNetOptions, head="fc")
def resnet18(num_classes: int, image_shape: ImageShape, opts: ImageNetResNetOptions) -> nn.Module:
    return _imagenet_resnet("resnet18", num_classes, image_shape, opts)


@register("resnet50", options=ImageNetResNetOptions, head="fc")
def resnet50(num_classes: int, image_shape: ImageShape, opts: ImageNetResNetOptions) -> nn.Module:
    return _imagenet_resnet("resnet50", num_classes, image_shape, opts)
