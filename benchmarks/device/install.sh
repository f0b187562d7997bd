#!/usr/bin/env bash
# Install, on the offline GPU machine, the bundle that build_bundle.sh made here and the `run` calls carried
# there group by group: check every part, join, pip-install the wheels into a folder, unpack the libraries,
# put the crop decoder into pipelines/, write env.sh, and check that ffcv, it and nvidia.dali import. See benchmarks/device/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/device/install.sh [--bundle DIR] [--prefix DIR] [--stash GROUPDIR]... [--stash-only]

  --stash GROUPDIR  check an arrived group folder (e.g. .device-bundle/group3) and copy its parts into the
                    bundle folder; repeatable. Prints the groups still to send.
  --stash-only      stop after stashing (the calls before the last group's)
  --bundle DIR      where the parts are collected (default /tmp/bundle; it survives while the machine is warm)
  --prefix DIR      where the wheels are installed (default /tmp/pydeps); DIR/env.sh sets PYTHONPATH and
                    LD_LIBRARY_PATH, and BUNDLE_DATA to the datasets' folder
With every group stashed it verifies all parts (sha256), joins them into BUNDLE/files, verifies each file,
installs and prints one line per module: 'ffcv: ok 1.0.2' or 'ffcv: FAILED: <why>'. Exit status 0 when
all import, 1 when one does not, 2 for a missing or corrupt part. Re-running skips what is already done.
Set PYTHON to choose the interpreter (default python3).
EOF
}

die() { echo "error: $*" >&2; exit 2; }

BUNDLE=/tmp/bundle
PREFIX=/tmp/pydeps
STASH=()
STASH_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --bundle) BUNDLE=$(realpath -m "${2:?--bundle needs a folder}"); shift ;;
    --prefix) PREFIX=$(realpath -m "${2:?--prefix needs a folder}"); shift ;;
    --stash) STASH+=("$(realpath -m "${2:?--stash needs a group folder}")"); shift ;;
    --stash-only) STASH_ONLY=1 ;;
    *) die "unknown option '$1'; see --help" ;;
  esac
  shift
done
cd "$(dirname "$0")/../.."  # the project root: bundle.py runs as a module of it
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "no '$PY' here; set PYTHON to the Python that holds torch"
mkdir -p "$BUNDLE" "$PREFIX"

if [ ${#STASH[@]} -gt 0 ]; then
  "$PY" -m benchmarks.device.bundle stash --bundle "$BUNDLE" "${STASH[@]}"
fi
[ "$STASH_ONLY" = 1 ] && exit 0

echo "== checking and joining the parts in $BUNDLE"
"$PY" -m benchmarks.device.bundle unpack --bundle "$BUNDLE" --dest "$BUNDLE/files" | sed "s|$BUNDLE/files/|  |"
FILES=$BUNDLE/files

echo "== wheels into $PREFIX"
mkdir -p "$PREFIX/.stamps"
todo=()
for wheel in "$FILES"/wheels/*.whl "$FILES"/wheels/if-missing/*.whl; do
  [ -f "$wheel" ] || continue
  name=$(basename "$wheel")
  dist=${name%%-*}
  if [ -f "$PREFIX/.stamps/$name" ]; then
    echo "  installed before: $name"
  elif [[ $wheel == */if-missing/* ]] && "$PY" -c "import ${dist,,}" 2>/dev/null; then
    echo "  already here, skipped: $dist $("$PY" -c "from importlib.metadata import version; print(version('$dist'))" \
      2>/dev/null || echo '(version unknown)')"
  else
    todo+=("$wheel")
  fi
done
if [ ${#todo[@]} -gt 0 ]; then
  printf '  installing %s\n' "${todo[@]##*/}"
  "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --upgrade --target "$PREFIX" "${todo[@]}" \
    || die "pip could not install the wheels above into $PREFIX"
  for wheel in "${todo[@]}"; do touch "$PREFIX/.stamps/${wheel##*/}"; done
fi
if [ -f "$PREFIX/nvidia/__init__.py" ]; then
  # nvimgcodec ships nvidia/__init__.py, which would hide torch's nvidia.* packages in site-packages:
  # make the folder span every nvidia/ on sys.path instead
  echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > "$PREFIX/nvidia/__init__.py"
fi

echo "== shared libraries into $PREFIX/lib"
mkdir -p "$PREFIX/lib"
for archive in "$FILES"/libs/*.tar.xz; do
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$archive" "$PREFIX/lib"
done
ls "$PREFIX/lib" | tr '\n' ' ' | sed 's/^/  /'; echo

echo "== the FFCV backend's crop decoder into pipelines/"
cp "$FILES/project/pipelines/_crop_decode.abi3.so" pipelines/

cat > "$PREFIX/env.sh" <<EOF
# source me: the bundle's Python packages and shared libraries, and its datasets' folder
export PYTHONPATH=$PREFIX\${PYTHONPATH:+:\$PYTHONPATH}
export LD_LIBRARY_PATH=$PREFIX/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export BUNDLE_DATA=$FILES/data
EOF
echo "== wrote $PREFIX/env.sh (source it before using ffcv or DALI)"
# shellcheck disable=SC1091
source "$PREFIX/env.sh"

echo "== import checks ($("$PY" --version), $(command -v "$PY"))"
status=0
check() {  # name, python code that prints the version
  local out
  if out=$("$PY" -c "$2" 2>&1); then
    echo "$1: ok $out"
  else
    echo "$1: FAILED: $(printf '%s\n' "$out" | grep -v '^\s*$' | tail -n 1)"
    status=1
  fi
}
check ffcv "import ffcv, ffcv.loader, ffcv.fields.decoders; from importlib.metadata import version; print(version('ffcv'))"
so=$(ls "$PREFIX"/ffcv/_libffcv*.so 2>/dev/null || true)
if [ -n "$so" ] && ldd "$so" | grep -q "not found"; then
  echo "  _libffcv cannot find: $(ldd "$so" | awk '/not found/ {print $1}' | tr '\n' ' ')"
fi
check crop_decode "from beton_trainer.pipelines.crop_library import available; assert available(), 'not built'; print('built')"
check nvidia.dali "import nvidia.dali as dali, nvidia.dali.fn, nvidia.dali.plugin.pytorch; print(dali.__version__)"
exit $status
