"""Top-k accuracy on the device, checked against a per-row count by hand."""

from __future__ import annotations

import torch

from beton_trainer.trainer.metrics import topk_correct


def test_topk_correct_counts_targets_among_the_k_highest():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.0],  # ranks: 1, 2, 3, 4, 0, 5
                           [0.6, 0.1, 0.2, 0.3, 0.4, 0.5],  # ranks: 0, 5, 4, 3, 2, 1
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([1, 4, 0])  # top-1 hit; 3rd best; last
    counts = [topk_correct(logits, targets, k) for k in (1, 2, 3, 5, 6)]
    assert all(c.dtype == torch.int64 and c.dim() == 0 and c.device == logits.device for c in counts)
    assert [int(c) for c in counts] == [1, 1, 2, 2, 3]
    assert int(topk_correct(logits, targets, 10)) == 3  # k past the number of classes: every row counts


def test_topk_correct_agrees_with_a_sort_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 20, generator=gen)
    targets = torch.randint(0, 20, (500,), generator=gen)
    rank = (logits > logits.gather(1, targets[:, None])).sum(1)  # how many classes score higher
    for k in (1, 5):
        assert int(topk_correct(logits, targets, k)) == int((rank < k).sum())
