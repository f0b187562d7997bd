#!/usr/bin/env bash
# Make .venv ready: system libraries FFCV and pipelines/crop_decode.c build against, PyTorch, then this project
# (compiling that decoder) and its tools.
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
missing=()
pkg-config --exists opencv4 2>/dev/null || missing+=(libopencv-dev)
[ -f /usr/include/turbojpeg.h ] || missing+=(libturbojpeg0-dev)
[ -f /usr/include/jpeglib.h ] || missing+=(libjpeg-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} (FFCV and the crop decoder build against them)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: FFCV and the crop decoder need ${missing[*]}; install them with your package manager (e.g. apt-get install ${missing[*]}) and re-run" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml setup.py pipelines/crop_decode.c scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # CPU-friendly pins that this machine kind caches locally; a GPU machine may bring its own torch first.
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    case "$(uname -m)" in
      aarch64) .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1 ;;
      *) .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 ;;
    esac
  fi
  extras=dev,ffcv
  [ "$(uname -s)" = Linux ] && extras="dev,ffcv,dali-cu13"
  .venv/bin/pip install -q -e ".[${extras}]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
