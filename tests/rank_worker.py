"""One rank of the two-process training tests (torchrun, gloo, CPU): train.py in this process, with test hooks.

--slow-best: every epoch is a new best (early stopping's observe is patched) and rank 0 writes the last
best.safetensors two seconds late, so the other rank reaches finish() while the file still holds the
previous epoch's weights. Every rank writes rank<N>.json into --out: a digest of the weights (parameters and
buffers) it tested at the end, and of those it evaluated at every epoch's end.
--sigterm-after RANK:N,...: the rank named sends itself SIGTERM after its N-th training step (as a cluster's
preemption reaches the ranks of a job at different moments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beton_trainer.common.errors import run_cli  # noqa: E402
from beton_trainer.trainer import early_stopping, loop, step  # noqa: E402
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
    parser.add_argument("--sigterm-after", default="")
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

    signal_after = dict(map(int, item.split(":")) for item in args.sigterm_after.split(",") if item).get(rank)
    if signal_after:
        real_call, calls = step.TrainStep.__call__, []

        def signalling_call(self, *a, **kw):
            real_call(self, *a, **kw)
            calls.append(1)
            if len(calls) == signal_after:
                os.kill(os.getpid(), signal.SIGTERM)

        step.TrainStep.__call__ = signalling_call

    real_evaluate, record = loop.evaluate, {"evaluated": []}

    def recording_evaluate(model, loader, recipe, accelerator, collect=False, extra=None):
        if collect:  # the final test
            record["tested"] = digest(model.state_dict())
        else:
            record["evaluated"].append(digest(model.state_dict()))
        (args.out / f"rank{rank}.json").write_text(json.dumps(record))
        return real_evaluate(model, loader, recipe, accelerator, collect=collect, extra=extra)

    loop.evaluate = recording_evaluate
    run_cli(train_main, train_argv)  # a UserError is one line and exit status 2, as from train.py


if __name__ == "__main__":
    main()
