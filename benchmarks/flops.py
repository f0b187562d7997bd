"""FLOPs per image counted from the model itself, and model FLOP utilization (MFU) against a device's peak.

FLOPs are counted by torch's FlopCounterMode (2 per multiply-add, convolutions and matmuls only), so a
model change changes the count instead of silently leaving a hard-coded constant wrong.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peak FLOP/s from NVIDIA's datasheets (the sparse figures are twice these);
# matched in order against torch.cuda.get_device_name, so the specific names come first
PEAK_BF16_DENSE = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12))


def flops_per_image(model: nn.Module, image_shape: tuple[int, int, int], train: bool) -> float:
    """FLOPs of one (H, W, C) image: the forward pass, or forward + backward when `train`.

    Counted on a copy on the meta device (shapes only, no arithmetic, so a large model costs nothing)
    with a batch of 2 (train-mode BatchNorm needs more than one sample); the caller's model, its
    gradients and its BatchNorm statistics are left untouched.
    """
    h, w, c = image_shape
    probe = copy.deepcopy(model).to("meta").float().train(train)
    images = torch.randn(2, c, h, w, device="meta")
    with FlopCounterMode(display=False) as counter:
        if train:
            probe(images).sum().backward()
        else:
            with torch.no_grad():
                probe(images)
    return counter.get_total_flops() / 2


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None for a device not in the table (the CPU included)."""
    return next((peak for name, peak in PEAK_BF16_DENSE if name in device_name), None)
