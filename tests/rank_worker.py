"""One rank of the two-process training tests (torchrun, gloo, CPU): train.py in this process, with test hooks.

--slow-best: every epoch is a new best (early stopping's observe is patched) and rank 0 writes the last
best.safetensors two seconds late, so the other rank reaches finish() while the file still holds the
previous epoch's weights. Every rank writes rank<N>.json into --out: a digest of the weights it tested.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beton_trainer.trainer import early_stopping, loop  # noqa: E402
from beton_trainer.trainer.cli import main as train_main  # noqa: E402


def digest(state: dict[str, torch.Tensor]) -> str:
    """The weights, whatever their memory format: names, shapes and values in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + str(tuple(state[name].shape)).encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slow-best", action="store_true")
    args, train_argv = parser.parse_known_args()
    rank = int(os.environ["RANK"])

    if args.slow_best:
        early_stopping.EarlyStopping.observe = lambda self, row, config: True
        real_save, saves = early_stopping.save_weights, []

        def slow_save(model, path):
            if Path(path).name == "best.safetensors":
                saves.append(path)
                if len(saves) > 1:
                    time.sleep(2)
            real_save(model, path)

        early_stopping.save_weights = slow_save

    real_evaluate = loop.evaluate

    def recording_evaluate(model, loader, recipe, accelerator, collect=False, extra=None):
        if collect:  # the final test
            (args.out / f"rank{rank}.json").write_text(json.dumps({"tested": digest(model.state_dict())}))
        return real_evaluate(model, loader, recipe, accelerator, collect=collect, extra=extra)

    loop.evaluate = recording_evaluate
    train_main(train_argv)


if __name__ == "__main__":
    main()
