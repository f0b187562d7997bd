"""The epoch's running sums: queued a few steps at a time on the device, they must equal sums taken step by
step in float64, across flushes, a smaller last batch, mixed (soft) targets and distillation terms, and
carry on from a mid-epoch checkpoint's totals."""

from __future__ import annotations

import pytest
import torch

from beton_trainer.trainer.step import EpochSums, EpochTotals


def steps(n_steps: int, batch: int, last: int, classes: int = 10, soft: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_steps):
        n = last if i == n_steps - 1 else batch
        logits = torch.randn(n, classes, generator=gen)
        labels = torch.randint(classes, (n,), generator=gen)
        targets = torch.nn.functional.one_hot(labels, classes).float() * 0.7 + 0.03 if soft else labels
        terms = {"loss": torch.rand((), generator=gen) * 3}
        if seed % 2:
            terms |= {"kd_soft_loss": torch.rand((), generator=gen), "kd_hard_loss": torch.rand((), generator=gen)}
        grad_norm = torch.rand((), generator=gen) if i % 3 == 0 else None
        yield terms, logits, targets, grad_norm, labels


def by_hand(batches, start: EpochTotals) -> EpochTotals:
    t = EpochTotals(**vars(start))
    for terms, logits, _, grad_norm, labels in batches:
        n = len(labels)
        t.loss_sum += float(terms["loss"]) * n
        t.correct += int((logits.argmax(1) == labels).sum())
        t.seen += n
        if grad_norm is not None:
            t.grad_norm_sum += float(grad_norm)
            t.grad_norms += 1
        if "kd_soft_loss" in terms:
            t.kd_soft_sum += float(terms["kd_soft_loss"]) * n
            t.kd_hard_sum += float(terms["kd_hard_loss"]) * n
    return t


@pytest.mark.parametrize("n_steps,soft,seed", [(1, False, 0), (70, False, 0), (45, True, 1), (32, False, 3)])
def test_queued_sums_equal_step_by_step_sums(n_steps, soft, seed):
    start = EpochTotals(loss_sum=12.5, correct=7, seen=64, grad_norm_sum=2.0, grad_norms=1)  # a resumed epoch
    batches = list(steps(n_steps, batch=16, last=5, soft=soft, seed=seed))
    sums = EpochSums(torch.device("cpu"), start)
    for i, (terms, logits, targets, grad_norm, _) in enumerate(batches):
        sums.add(terms, logits, targets, grad_norm)
        if i == 40:  # a logging step reads the sums mid-queue; the queue goes on from there
            assert vars(EpochSums.totals(sums.stacked())) == pytest.approx(vars(by_hand(batches[:41], start)),
                                                                           rel=1e-12)
    got = EpochSums.totals(sums.stacked())
    assert vars(got) == pytest.approx(vars(by_hand(batches, start)), rel=1e-12)
    assert EpochSums.totals(sums.stacked()) == got  # reading again adds nothing twice
