"""One rank of the same-data test, started by torchrun (gloo, CPU).

Each rank works in its own folder (`--nodes`, indexed by rank), as if on its own node holding its own
copy of the data at the same relative path, runs `check_same_data` on every `--data` path and writes
{path: "ok" | "error: <message>"} to `--out/rank-<k>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from beton_trainer.common.errors import UserError  # noqa: E402
from beton_trainer.trainer.distributed import check_same_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=Path, nargs="+", required=True, help="one working folder per rank")
    parser.add_argument("--data", nargs="+", required=True, help="dataset paths, relative to each rank's folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    os.chdir(args.nodes[rank])
    results = {}
    for path in args.data:
        try:
            check_same_data(accelerator, path)
            results[path] = "ok"
        except UserError as exc:
            results[path] = f"error: {exc}"
    (args.out / f"rank-{rank}.json").write_text(json.dumps(results))
    accelerator.end_training()


if __name__ == "__main__":
    main()
