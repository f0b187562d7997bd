"""The training loss: cross-entropy on hard or soft targets, plus knowledge distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from beton_trainer.trainer.config import Recipe

__all__ = ["loss_terms"]


def loss_terms(recipe: Recipe, logits: torch.Tensor, targets: torch.Tensor,
               teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`loss` to minimise; with a teacher also its `kd_hard_loss` and `kd_soft_loss` parts (logged).

    MixUp/CutMix soft targets already carry the label smoothing; hard labels get it here. The soft
    term is Hinton's KL(teacher || student) at temperature T, scaled by T² so its gradients keep their
    size as T changes, and mixed with the hard term by `alpha`.
    """
    if targets.dtype.is_floating_point:
        hard = F.cross_entropy(logits, targets)
    else:
        hard = F.cross_entropy(logits, targets, label_smoothing=recipe.loss.label_smoothing)
    if teacher_logits is None:
        return {"loss": hard}
    kd = recipe.loss.distill
    t = kd.temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t
    return {"loss": kd.alpha * soft + (1 - kd.alpha) * hard, "kd_hard_loss": hard, "kd_soft_loss": soft}
