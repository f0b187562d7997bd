#!/usr/bin/env bash
# The main job on a small real default: convert MNIST to .beton files, train `mnist_cnn` on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -n "${DATA_ROOT:-}" ]; then
  [ -d "$DATA_ROOT/mnist" ] || { echo "error: DATA_ROOT=$DATA_ROOT has no mnist/ folder with the IDX files" >&2; exit 2; }
  $PY -m convert mnist --src "$DATA_ROOT/mnist" --out data
else
  $PY -m convert mnist --src data/raw/mnist --out data --download || {
    echo "hint: offline? set DATA_ROOT to a folder whose mnist/ holds the four MNIST IDX files, e.g. DATA_ROOT=../shared/data make demo" >&2
    exit 2; }
fi
$PY train.py --recipe mnist_cnn --data data/mnist --cpu --run-dir "runs/mnist_cnn-$(date +%Y%m%d-%H%M%S)"
