"""Top-5 accuracy is logged beside accuracy when there are more than five classes, and it is right."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from beton_trainer.format.dataset import open_split
from beton_trainer.pipelines.augment import EvalTransform
from beton_trainer.trainer.metrics import topk_correct
from beton_trainer.trainer.modelio import make_model
from tests.train_helpers import metrics, run_train


def test_top5_accuracy_matches_a_hand_computation(tiny_rgb_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = run_train(["--recipe", "c10_cnn_smoke", "--data", str(tiny_rgb_data), "--run-dir", str(run_dir),
                         "--cpu"])
    rows = metrics(run_dir)
    assert all(float(r["test_top5_accuracy"]) >= float(r["test_accuracy"]) for r in rows)
    model = make_model(json.loads((run_dir / "model.json").read_text()))
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    split = open_split(tiny_rgb_data, "test")
    images, labels = EvalTransform(mean=split.mean, std=split.std, channels_last=False)(
        torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2), torch.from_numpy(split.labels))
    with torch.no_grad():
        logits = model.eval()(images)
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # how many classes score above the true one
    assert summary["test_top5_accuracy"] == int((ranks < 5).sum()) / len(labels)
    assert int(topk_correct(logits, labels, 5)) == int((ranks < 5).sum())
