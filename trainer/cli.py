"""The command line of `train.py`: arguments -> recipe -> `trainer.loop.train`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.trainer.config import load_recipe
from beton_trainer.trainer.distributed import launcher_overrides
from beton_trainer.trainer.loop import train
from beton_trainer.trainer.state import RunOptions, StopRequest

__all__ = ["main", "parse_args", "run"]

DESCRIPTION = """Train an image classifier from a recipe: `accelerate launch train.py --recipe c10_finetune`.

Runs as `python train.py` on one device or under `accelerate launch` / `torchrun` on N processes."""
EXAMPLES = """examples:
  python train.py --recipe mnist_cnn --data data/mnist
  accelerate launch train.py --recipe c10_finetune --set model.pretrained=false
  python train.py --recipe c10_cnn --set data.batch_size=256 --set phases.0.epochs=5
  python train.py --recipe mnist_cnn --run-dir runs/a --resume auto"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="name in recipes/ (e.g. c10_finetune) or a .toml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (dotted keys, repeatable): --set data.batch_size=256")
    parser.add_argument("--data", help="converted dataset folder (holds manifest.json); overrides data.path")
    parser.add_argument("--loader", choices=["tensor", "ffcv", "dali", "photo"], help="overrides data.loader")
    parser.add_argument("--pretrained", metavar="PATH", help="torchvision-format state dict for model.pretrained")
    parser.add_argument("--run-dir", help="run folder (default runs/<recipe>-<timestamp>)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                        help="continue from the newest good checkpoint of --run-dir (auto; a fresh run there if it "
                             "has none yet) or of PATH")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms")
    parser.add_argument("--check-syncs", action="store_true",
                        help="stop at the first host-device sync in a steady-state step (CUDA's sync debug mode; "
                             "an operation recorder on the CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N steps after warm-up with torch.profiler: a Chrome/Perfetto trace "
                             "(profile-rank0.json) and a table (profile.txt) in the run folder")
    args = parser.parse_args(argv)
    if args.profile < 0:
        raise UserError(f"--profile {args.profile}: give the number of steps to profile (e.g. --profile 20)")
    if args.data:
        args.overrides.append(f"data.path={json.dumps(args.data)}")
    if args.loader:
        args.overrides.append(f"data.loader={args.loader}")
    if args.pretrained:
        args.overrides.append(f"model.pretrained={json.dumps(args.pretrained)}")
    if args.resume and args.resume != "auto" and args.run_dir:
        raise UserError("--resume PATH and --run-dir both name a run folder: pass one of them")
    return args


def run() -> None:
    """The `beton-train` command (and train.py)."""
    run_cli(main, sys.argv[1:])


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """SIGTERM (a cluster's preemption, `kill`) and SIGINT (Ctrl-C) ask the run to stop with a checkpoint at its
    next logging step; the previous handlers come back afterwards. Only the command line installs them."""
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, stop.request) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, [*launcher_overrides(), *args.overrides])  # the user's --set wins
    options = RunOptions(run_dir=args.run_dir, resume=args.resume, cpu=args.cpu, deterministic=args.deterministic,
                         check_syncs=args.check_syncs, profile_steps=args.profile)
    with stop_on_signals(options.stop):
        train(recipe, options)
    return 0


if __name__ == "__main__":
    run()
