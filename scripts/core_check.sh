#!/usr/bin/env bash
# CI's proof that the core installs and runs alone, as a user gets it (.ci/run calls it). A wheel is built from
# the tracked files with no compiler reachable (CC points nowhere: the optional crop decoder must be skipped, not
# fail the build); it must hold one import package, beton_trainer, its recipes and its commands. A second virtual
# environment installs that wheel and the core's dependencies only: there ffcv, numba and DALI must not import.
# Then, from a folder outside the checkout that holds a user's own `models/` package and `common.py` (which fail
# loudly if anything imports them), the commands run as installed: each --help, the conversion of MNIST and
# CIFAR-10, two smoke trainings with the tensor backend, the one-line refusal of --loader ffcv, the hymenoptera
# photos converted and the three photo smoke recipes trained with the photo backend, and the API notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA_ROOT:?set DATA_ROOT to the folder holding mnist/ and cifar10-jpeg.tar.xz}"
DATA_ROOT=$(cd "$DATA_ROOT" && pwd)
ENV=$PWD/.venv-core
PY=$ENV/bin/python
fail() { echo "core check: $*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/src  # tracked files only: no build/ folder or compiled decoder from another environment
mkdir -p "$src"
git ls-files -z | xargs -0 cp --parents -t "$src" 2>/dev/null || fail "copying the tracked files failed"

[ -x "$PY" ] || python3 -m venv "$ENV"
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }  # pip's notes on this machine's local index folders
"$PY" -c "import torch, torchvision" 2>/dev/null || quiet "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
CC=/nonexistent/cc CXX=/nonexistent/c++ quiet "$PY" -m pip wheel -q --no-deps -w "$work/wheel" "$src" 2>/dev/null \
  || fail "building the wheel failed"
wheel=$(ls "$work"/wheel/beton_trainer-*.whl)
"$PY" - "$wheel" <<'EOF' || fail "the wheel's contents are wrong (above)"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names})
info = next(t for t in tops if t.endswith(".dist-info"))
entry_points = zipfile.ZipFile(sys.argv[1]).read(f"{info}/entry_points.txt").decode()
recipes = [n for n in names if n.startswith("beton_trainer/recipes/") and n.endswith(".toml")]
print(f"core check: wheel {sys.argv[1].rsplit('/', 1)[1]}: {len(names)} files; top level {', '.join(tops)}; "
      f"{len(recipes)} recipes; commands " + ", ".join(l.split(" =")[0] for l in entry_points.splitlines() if " = " in l))
assert tops == ["beton_trainer", info], f"the wheel installs more than beton_trainer: {tops}"
assert len(recipes) >= 20 and "beton_trainer/recipes/c10_finetune.toml" in names, recipes
for command in ("beton-train", "beton-convert", "beton-studies"):
    assert f"{command} = " in entry_points, f"no {command} in entry_points.txt"
assert not [n for n in names if n.endswith((".so", ".c"))], "the core wheel holds compiled or C files"
EOF
quiet "$PY" -m pip install -q --force-reinstall --no-deps "$wheel"
quiet "$PY" -m pip install -q --only-binary :all: "$wheel" pytest nbclient nbformat ipykernel
for module in ffcv numba nvidia.dali; do
  ! "$PY" -c "import $module" 2>/dev/null || fail "$module is importable in the core environment"
done
echo "core check: installed from the wheel without ffcv, numba, DALI or a compiler"

user=$work/user  # a user's project folder, outside the checkout
mkdir -p "$user/models"
echo 'raise ImportError("the user'"'"'s own models/ package was imported by beton_trainer")' > "$user/models/__init__.py"
echo 'raise ImportError("the user'"'"'s own common.py was imported by beton_trainer")' > "$user/common.py"
cd "$user"
export PATH=$ENV/bin:$PATH
where=$(python -c "import beton_trainer; print(beton_trainer.__file__)")
[[ $where == "$ENV"/* ]] || fail "beton_trainer was imported from $where, not from the installed wheel"
for command in beton-train beton-convert beton-studies; do
  "$command" --help | grep -q "^usage: " || fail "$command --help printed no usage"
done
beton-convert mnist --src "$DATA_ROOT/mnist" --out data 2>/dev/null | tail -1
beton-convert imagefolder --src "$DATA_ROOT/cifar10-jpeg.tar.xz" --out data --name cifar10 2>/dev/null | tail -1
for job in "mnist_cnn_smoke mnist" "c10_cnn_smoke cifar10"; do
  set -- $job
  beton-train --recipe "$1" --data "data/$2" --loader tensor --cpu --run-dir "runs/$1" 2>/dev/null \
    | grep "^test accuracy" || fail "$1 did not finish"
  [ -s "runs/$1/summary.json" ] || fail "$1 wrote no summary.json"
done
if out=$(beton-train --recipe mnist_cnn_smoke --data data/mnist --loader ffcv --cpu --run-dir runs/ffcv 2>&1); then
  fail "--loader ffcv ran without ffcv"
fi
[ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q 'pip install .\[ffcv\]' \
  || fail "--loader ffcv without ffcv did not stop with one line naming the extra: $out"
# the photo recipes train in the core, with the photo backend (no ffcv, numba or DALI)
[ -f "$DATA_ROOT/hymenoptera_data.tar" ] || fail "DATA_ROOT holds no hymenoptera_data.tar (the photo recipes' data)"
beton-convert imagefolder --src "$DATA_ROOT/hymenoptera_data.tar" --out data --name hymenoptera \
  --encode jpg --max-side 500 2>/dev/null | tail -1
for recipe in hymenoptera_finetune_smoke imagenet_rn18_16_smoke imagenet_rn50_88_smoke; do
  beton-train --recipe "$recipe" --data data/hymenoptera --cpu --run-dir "runs/$recipe" \
    2>/dev/null | grep "^test accuracy" || fail "$recipe did not finish"
  [ -s "runs/$recipe/summary.json" ] || fail "$recipe wrote no summary.json"
  grep -q '^loader = "photo"' "runs/$recipe/config.toml" || fail "$recipe did not train with the photo backend"
done
if out=$(beton-train --recipe imagenet_rn18_16 --data data/hymenoptera --cpu \
    --run-dir runs/imagenet-ffcv 2>&1); then
  fail "imagenet_rn18_16 (data.loader = ffcv) ran without ffcv"
fi
[ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q -- '--loader photo$' \
  || fail "the ffcv recipe without ffcv did not stop with one line naming --loader photo: $out"
echo "core check: trained the three photo smoke recipes with the photo backend; ffcv's refusal names it"

NOTEBOOK_DIR=$user python -m pytest -q -p no:cacheprovider "$src/tests/test_notebook.py"
echo "core check: passed"
