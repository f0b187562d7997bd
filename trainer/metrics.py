"""Classification metrics computed on the device, so evaluation never waits on the host per batch."""

from __future__ import annotations

import torch

__all__ = ["topk_correct"]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows of `logits` (N, classes) rank their int64 target among the k highest scores: a 0-dim
    int64 tensor on the logits' device (no host sync). k is capped at the number of classes."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == targets[:, None]).any(dim=1).sum()
