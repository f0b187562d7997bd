#!/usr/bin/env bash
# Build, on this CPU machine, everything a bare offline GPU machine (Python 3.12, torch, no ffcv, no DALI)
# needs to run every loader backend, cut into call-sized groups: see benchmarks/device/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/device/build_bundle.sh [--out DIR] [--dali cuda130|cuda120] [--python PY312] [--data DIR]
                                         [--no-data] [--force]

Builds DIR/group1, DIR/group2, ... (default DIR: .device-bundle), each at most 60 MiB, to be carried to
the GPU machine one `run` call at a time, plus DIR/bundle.json (every file and part, size, sha256, group):
  wheels/            ffcv (built here for cp312), nvidia-dali-<flavour> and the nvimgcodec/nvcomp wheels
                     its metadata names, downloaded as cp312 manylinux x86_64 wheels
  wheels/if-missing/ DALI's import-time Python deps (installed there only when not importable)
  libs/              ffcv-libs.tar.xz: the shared libraries _libffcv and the crop decoder need beyond the
                     C/C++ runtime
  project/           pipelines/_crop_decode.abi3.so, the FFCV backend's crop decoder as `make setup` built it
  data/              cifar10-jpeg.tar.xz and mnist/*.gz from the shared data folder (not with --no-data)
Downloads and the ffcv build are cached in DIR/cache (--force starts over); re-running re-packs only.

  --out DIR       output folder (default .device-bundle in the project root; keep it git-ignored)
  --dali FLAVOUR  cuda130 (default; driver >= 580) or cuda120 (driver >= 525)
  --python PY312  a Python 3.12 to build ffcv with (default: newest ~/.pyenv/versions/3.12.*/bin/python)
  --data DIR      the shared data folder (default: $DATA_ROOT, else ../shared/data)
  --no-data       leave the datasets out
  --force         rebuild and re-download everything
EOF
}

die() { echo "error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/.device-bundle
DALI=cuda130
PY312=""
DATA=${DATA_ROOT:-$ROOT/../shared/data}
WITH_DATA=1
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT=$(realpath -m "${2:?--out needs a folder}"); shift ;;
    --dali) DALI=${2:?--dali needs cuda130 or cuda120}; shift ;;
    --python) PY312=${2:?--python needs a path}; shift ;;
    --data) DATA=${2:?--data needs a folder}; shift ;;
    --no-data) WITH_DATA=0 ;;
    --force) FORCE=1 ;;
    *) die "unknown option '$1'; see --help" ;;
  esac
  shift
done
case "$DALI" in cuda130|cuda120) ;; *) die "--dali must be cuda130 or cuda120, got '$DALI'" ;; esac

VPY=$ROOT/.venv/bin/python  # this project's environment: pip, and the versions the tests ran with
[ -x "$VPY" ] || die "$VPY is missing; run 'make setup' first"
if [ -z "$PY312" ]; then
  PY312=$(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$PY312" ] && [ -x "$PY312" ] || die "no Python 3.12 found; install one (e.g. pyenv install 3.12) or pass --python PATH"
"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || die "$PY312 is not Python 3.12; pass --python PATH to a 3.12 interpreter"
pkg-config --exists opencv4 && [ -f /usr/include/turbojpeg.h ] \
  || die "ffcv builds against OpenCV and libturbojpeg; apt-get install libopencv-dev libturbojpeg0-dev pkg-config"
if [ "$WITH_DATA" = 1 ]; then
  [ -f "$DATA/cifar10-jpeg.tar.xz" ] && [ -d "$DATA/mnist" ] \
    || die "no cifar10-jpeg.tar.xz and mnist/ in $DATA; pass --data DIR (the shared data folder) or --no-data"
fi

version() { "$VPY" -c "import sys; from importlib.metadata import version; print(version(sys.argv[1]))" "$1"; }
FFCV_VERSION=$(version ffcv)
DALI_VERSION=$(version nvidia-dali-cuda130)  # the DALI release the CPU tests ran with, in either flavour
IF_MISSING=(astunparse gast optree six packaging)  # what `import nvidia.dali` needs beyond numpy and torch

CACHE=$OUT/cache
[ "$FORCE" = 1 ] && rm -rf "$CACHE"
mkdir -p "$CACHE/ffcv" "$CACHE/wheels/dali-$DALI" "$CACHE/wheels/if-missing"

pip_download() {  # cp312 manylinux x86_64 wheels, no dependency resolution
  local dest=$1; shift
  "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}

echo "== ffcv $FFCV_VERSION for cp312 (built with $PY312)"
if ! ls "$CACHE"/ffcv/ffcv-"$FFCV_VERSION"-cp312-*.whl >/dev/null 2>&1; then
  "$PY312" -m pip wheel -q --no-deps "ffcv==$FFCV_VERSION" -w "$CACHE/ffcv"
fi
FFCV_WHEEL=$(ls "$CACHE"/ffcv/ffcv-"$FFCV_VERSION"-cp312-*.whl)

echo "== shared libraries of _libffcv and the crop decoder"
rm -rf "$CACHE/so" "$CACHE/libs" && mkdir -p "$CACHE/so" "$CACHE/libs"
"$VPY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
[z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith('ffcv/_libffcv')]" "$FFCV_WHEEL" "$CACHE/so"
SO=$(ls "$CACHE"/so/ffcv/_libffcv*.so)
# the FFCV backend's crop decoder (pipelines/crop_decode.c), built by `make setup`: plain C, abi3, any CPython 3
DECODER=$ROOT/pipelines/_crop_decode.abi3.so
[ -f "$DECODER" ] || die "$DECODER is missing; run 'make setup'"
for lib in "$SO" "$DECODER"; do
  if ldd "$lib" | grep -q "not found"; then
    die "$(basename "$lib") needs libraries missing here: $(ldd "$lib" | grep 'not found' | tr -s ' \t\n' ' ')"
  fi
done
# the C and C++ runtime (and zlib) are on every Linux that runs Python; everything else travels
SKIP='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libz)\.so'
ldd "$SO" "$DECODER" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u | while read -r soname path; do
  if ! [[ $soname =~ $SKIP ]]; then cp -L --preserve=timestamps "$path" "$CACHE/libs/$soname"; fi
done
mkdir -p "$CACHE/libs-tar"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$CACHE/libs" -cf - . \
  | xz -9 -T1 > "$CACHE/libs-tar/ffcv-libs.tar.xz"
ls "$CACHE/libs" | sed 's/^/  /'
max_version() { # the highest GLIBC_/GLIBCXX_ symbol version the .so files ask for
  for f in "$SO" "$DECODER" "$CACHE"/libs/*; do objdump -T "$f"; done 2>/dev/null | grep -oE "\b$1_[0-9.]+" | sort -uV | tail -n 1
}
GLIBC=$(max_version GLIBC); GLIBCXX=$(max_version GLIBCXX)
echo "  they need $GLIBC and $GLIBCXX (libstdc++) on the GPU machine"

echo "== nvidia-dali-$DALI $DALI_VERSION and the NVIDIA wheels it requires"
pip_download "$CACHE/wheels/dali-$DALI" "nvidia-dali-$DALI==$DALI_VERSION"
DALI_WHEEL=$(ls "$CACHE"/wheels/dali-"$DALI"/nvidia_dali_"$DALI"-"$DALI_VERSION"-*.whl)
mapfile -t NVIDIA_REQS < <("$VPY" - "$DALI_WHEEL" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    m = re.match(r"Requires-Dist: (nvidia-[A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)(;.*)?$", line)
    if m and "extra" not in (m.group(4) or ""):
        print(m.group(1) + m.group(3).replace(" ", ""))
EOF
)
[ ${#NVIDIA_REQS[@]} -gt 0 ] || die "found no nvidia-* requirement in $DALI_WHEEL's metadata"
echo "  ${NVIDIA_REQS[*]}"
pip_download "$CACHE/wheels/dali-$DALI" "${NVIDIA_REQS[@]}"

echo "== installed there only when missing: ${IF_MISSING[*]}"
for name in "${IF_MISSING[@]}"; do pip_download "$CACHE/wheels/if-missing" "$name==$(version "$name")"; done

echo "== payload"
PAYLOAD=$OUT/payload
rm -rf "$PAYLOAD" && mkdir -p "$PAYLOAD/wheels/if-missing" "$PAYLOAD/libs"
link() { cp -l "$@" 2>/dev/null || cp "$@"; }  # hard links where the filesystem allows
link "$FFCV_WHEEL" "$CACHE"/wheels/dali-"$DALI"/*.whl "$PAYLOAD/wheels/"
for name in "${IF_MISSING[@]}"; do
  link "$(ls "$CACHE"/wheels/if-missing/"$name"-"$(version "$name")"-*.whl)" "$PAYLOAD/wheels/if-missing/"
done
link "$CACHE/libs-tar/ffcv-libs.tar.xz" "$PAYLOAD/libs/"
mkdir -p "$PAYLOAD/project/pipelines" && cp "$DECODER" "$PAYLOAD/project/pipelines/"
if [ "$WITH_DATA" = 1 ]; then
  mkdir -p "$PAYLOAD/data/mnist"
  cp "$DATA/cifar10-jpeg.tar.xz" "$PAYLOAD/data/"
  cp "$DATA"/mnist/*.gz "$PAYLOAD/data/mnist/"
fi

echo "== groups"
cd "$ROOT"
"$VPY" -m benchmarks.device.bundle pack --payload "$PAYLOAD" --out "$OUT" --note python=3.12 \
  --note glibc="${GLIBC#GLIBC_}" --note glibcxx="${GLIBCXX#GLIBCXX_}" \
  --note dali="nvidia-dali-$DALI==$DALI_VERSION" --note ffcv="$FFCV_VERSION"
echo "done: carry $OUT/groupN, one per call (benchmarks/device/README.md)"
