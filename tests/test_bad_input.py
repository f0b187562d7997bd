"""The catalogue of user mistakes: each one is a one-line error that names the problem and the fix, the
run stops with status 2, and nothing is written into the run folder it points at.

Every case (except the --run-dir ones) points --run-dir at a finished run; that folder's listing and
file contents are compared before and after. The cases call train.main in this process; one more runs the
real CLI to check the exit status and that stderr is exactly one `error: ...` line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from beton_trainer.common.errors import UserError
from beton_trainer.convert import convert_dataset
from tests.data_fixtures import write_cifar100
from tests.train_helpers import run_train

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the sha256 of its contents (folders map to '')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def damage_data(source: Path, target: Path, how: str) -> Path:
    """A copy of a converted dataset with one realistic kind of damage."""
    shutil.copytree(source, target)
    manifest_path, train = target / "manifest.json", target / "train.beton"
    manifest = json.loads(manifest_path.read_text())
    if how == "truncated":  # an interrupted copy
        train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    elif how == "garbage":  # same size, header overwritten
        data = bytearray(train.read_bytes())
        data[:4096] = b"\xff" * 4096
        train.write_bytes(bytes(data))
    elif how == "missing":
        train.unlink()
    elif how == "count":  # the manifest of another conversion
        manifest["splits"]["train"]["count"] += 1
        manifest_path.write_text(json.dumps(manifest))
    elif how == "manifest-json":
        manifest_path.write_text("{ not json")
    elif how == "manifest-gone":
        manifest_path.unlink()
    return target


SAME_AS_RUN = ["--set", "checkpoint_every_steps=2", "--set", "tensorboard=false"]  # the finished run's overrides


@pytest.fixture(scope="module")
def paths(mnist_data, tiny_rgb_data, tmp_path_factory) -> SimpleNamespace:
    """A finished MNIST run (the folder every case points at, and a teacher), damaged datasets and runs."""
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "finished"
    run_train(["--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--run-dir", str(run), "--cpu",
               *SAME_AS_RUN])
    # a run killed before it finished whose checkpoints are all damaged
    unusable = root / "unusable"
    shutil.copytree(run, unusable)
    (unusable / "summary.json").unlink()
    for weights in (unusable / "checkpoints").glob("step-*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    # a teacher whose model.json names another architecture than its weights
    impostor = root / "impostor"
    impostor.mkdir()
    shutil.copy(run / "model.safetensors", impostor)
    spec = json.loads((run / "model.json").read_text())
    (impostor / "model.json").write_text(json.dumps({**spec, "name": "mlp", "args": {}}))
    c100_source = write_cifar100(root / "c100-source", n_train=200, n_test=100, seed=5)
    c100 = convert_dataset("cifar100", c100_source["folder"], root / "c100", log=lambda _: None)
    broken = {how: damage_data(tiny_rgb_data, root / f"data-{how}", how)
              for how in ("truncated", "garbage", "missing", "count", "manifest-json", "manifest-gone")}
    toml_typo = root / "typo.toml"
    toml_typo.write_text('extends = "mnist_cnn_smoke"\nset = ["data.batchsize=64"]\n')
    toml_broken = root / "broken.toml"
    toml_broken.write_text("[data\nbatch_size = 64\n")
    return SimpleNamespace(mnist=str(mnist_data), tiny=str(tiny_rgb_data), run=run, unusable=unusable,
                           impostor=str(impostor), c100=str(c100),
                           broken={k: str(v) for k, v in broken.items()},
                           toml_typo=str(toml_typo), toml_broken=str(toml_broken), fresh=root / "never-made")


def teacher(path: object) -> list[str]:
    return ["--set", f"loss.distill.teacher={json.dumps(str(path))}"]


# (case id, extra arguments after `--recipe mnist_cnn_smoke --data MNIST --run-dir FINISHED --cpu`
#  (later flags win), a fragment of the expected message)
CASES = [
    # recipe: unknown keys, wrong types, out-of-range values, unknown names
    ("unknown-key", lambda p: ["--set", "seeed=1"], "unknown setting 'seeed' (did you mean 'seed'?)"),
    ("unknown-nested-key", lambda p: ["--set", "data.batch_sise=3"],
     "unknown setting 'data.batch_sise' (did you mean 'batch_size'?)"),
    ("unknown-key-in-file", lambda p: ["--recipe", p.toml_typo],
     "unknown setting 'data.batchsize' (did you mean 'batch_size'?)"),
    ("unknown-model-arg", lambda p: ["--set", "model.args={depth=3}"],
     "unknown setting 'model.args.depth' (did you mean 'width'?); valid keys here: batch_norm"),
    ("phase-key-at-top", lambda p: ["--set", "epochs=2"], "write phases.0.epochs"),
    ("wrong-type-int", lambda p: ["--set", 'data.batch_size="big"'],
     "'data.batch_size' must be an integer, got 'big'"),
    ("wrong-type-bool", lambda p: ["--set", "channels_last=3"],
     "'channels_last' must be true or false, got 3"),
    ("wrong-type-list", lambda p: ["--set", "phases.0.train_modules=5"],
     "'phases[0].train_modules' must be a list"),
    ("wrong-length", lambda p: ["--set", "phases.0.optimizer.betas=[0.9]"],
     "betas' must have 2 items, got 1"),
    ("batch-size-zero", lambda p: ["--set", "data.batch_size=0"], "'data.batch_size' must be >= 1, got 0"),
    ("lr-zero", lambda p: ["--set", "phases.0.optimizer.lr=0"],
     "'phases[0].optimizer.lr' must be > 0, got 0.0"),
    ("epochs-zero", lambda p: ["--set", "phases.0.epochs=0"], "'phases[0].epochs' must be >= 1, got 0"),
    ("label-smoothing", lambda p: ["--set", "loss.label_smoothing=1.5"],
     "'loss.label_smoothing' must be <= 1"),
    ("flip-probability", lambda p: ["--set", "augment.flip.p=2"], "'augment.flip.p' must be <= 1, got 2.0"),
    ("ema-decay", lambda p: ["--set", "ema_decay=2"], "'ema_decay' must be <= 1, got 2.0"),
    ("two-clippings", lambda p: ["--set", "grad_clip_norm=1", "--set", "grad_clip_value=1"],
     "both grad_clip_norm and grad_clip_value are set: choose one"),
    ("no-phases", lambda p: ["--set", "phases=[]"],
     "'phases' is empty: a recipe needs at least one [[phases]]"),
    ("unknown-model", lambda p: ["--set", "model.name=simple_cn"],
     "unknown model 'simple_cn' (did you mean 'simple_cnn'?)"),
    ("unknown-timm-model", lambda p: ["--set", 'model.name="timm:resnt18"', "--set", "model.args={}"],
     "unknown timm model 'resnt18' (did you mean 'resnet18'?)"),
    ("unknown-optimizer", lambda p: ["--set", "phases.0.optimizer.name=adamm"],
     "got 'adamm' (did you mean 'adam'?)"),
    ("unknown-schedule", lambda p: ["--set", "phases.0.schedule.name=cosin"],
     "got 'cosin' (did you mean 'cosine'?)"),
    ("unknown-loader", lambda p: ["--set", "data.loader=tensr"], "got 'tensr' (did you mean 'tensor'?)"),
    ("unknown-precision", lambda p: ["--set", "precision=fp8"],
     "'precision' must be one of ['no', 'fp16', 'bf16']"),
    ("missing-train-module", lambda p: ["--set", 'phases.0.train_modules=["backbone"]'],
     "names module 'backbone', which SimpleCNN does not have; top-level modules: features, head, pool"),
    ("missing-group-module", lambda p: ["--set", 'phases.0.param_groups=[{modules = ["nope"], lr = 0.1}]'],
     "'phases.0.param_groups.modules' names module 'nope'"),
    ("early-stop-metric-typo", lambda p: ["--set", "phases.0.early_stopping.metric=test_acc"],
     "early stopping watches 'test_acc', which this run does not compute; choose one of test_accuracy"),
    ("early-stop-without-val", lambda p: ["--set", "phases.0.early_stopping.metric=val_loss"],
     "(or set data.val_split=val)"),
    ("pretrained-missing", lambda p: ["--set", "model.name=resnet18_cifar", "--set", "model.args={}",
                                      "--pretrained", "/no/such.pth"],
     "pretrained weights file '/no/such.pth' not found"),
    # command line
    ("set-without-value", lambda p: ["--set", "data.batch_size"],
     "bad --set 'data.batch_size': write key=value"),
    ("set-empty-key", lambda p: ["--set", "=3"], "bad --set '=3': the key is empty"),
    ("set-bad-index", lambda p: ["--set", "phases.5.epochs=1"], "'phases' has 1 items; index with 0..0"),
    ("unknown-recipe", lambda p: ["--recipe", "mnist_cnn_smok"],
     "unknown recipe 'mnist_cnn_smok' (did you mean"),
    ("missing-recipe-file", lambda p: ["--recipe", "/no/such.toml"], "recipe file not found: /no/such.toml"),
    ("recipe-not-toml", lambda p: ["--recipe", p.toml_broken], "is not valid TOML"),
    ("resume-path-and-run-dir", lambda p: ["--resume", str(p.run)],
     "--resume PATH and --run-dir both name a run folder"),
    ("run-folder-taken", lambda p: [],
     "already holds a run; continue it with --resume auto, or choose another"),
    ("run-folder-is-a-file", lambda p: ["--run-dir", str(p.run / "summary.json")],
     "is a file; pass --run-dir with a folder"),
    ("resume-missing-folder", lambda p: ["--run-dir", "", "--resume", str(p.fresh)],
     "the folder does not exist; drop --resume to start a new run"),
    ("resume-auto-without-run-dir", lambda p: ["--resume", "auto", "--run-dir", ""],
     "--resume auto needs --run-dir"),
    ("resume-finished-run", lambda p: ["--run-dir", "", "--resume", str(p.run)],
     "has finished (summary.json is written); nothing to resume"),
    ("resume-unusable-run", lambda p: ["--run-dir", str(p.unusable), "--resume", "auto", *SAME_AS_RUN],
     "no usable checkpoint in"),
    ("resume-with-other-recipe", lambda p: ["--run-dir", str(p.unusable), "--resume", "auto", *SAME_AS_RUN,
                                            "--set", "seed=5"],
     "the recipe differs from the one"),
    ("pretrained-unsupported", lambda p: ["--pretrained", "/some/weights.pth"],
     "model 'simple_cnn' has no pretrained weights to load"),
    ("negative-step-count", lambda p: ["--set", "checkpoint_every_steps=-1"],
     "'checkpoint_every_steps' must be >= 0"),
    # data
    ("no-data-folder", lambda p: ["--data", "/no/such/dir"],
     "manifest.json is missing; create it with `beton-convert"),
    ("no-manifest", lambda p: ["--data", p.broken["manifest-gone"]], "manifest.json is missing"),
    ("manifest-not-json", lambda p: ["--data", p.broken["manifest-json"]], "is unreadable"),
    ("beton-truncated", lambda p: ["--data", p.broken["truncated"]],
     "(truncated or replaced); convert the dataset again"),
    ("beton-garbage", lambda p: ["--data", p.broken["garbage"]],
     "is truncated or not a .beton file (format version 65535, not FFCV's 2); convert"),
    ("beton-missing", lambda p: ["--data", p.broken["missing"]], "train.beton is missing; create it with"),
    ("manifest-mismatch", lambda p: ["--data", p.broken["count"]],
     "holds 640 records but the manifest says 641"),
    ("no-val-split", lambda p: ["--set", "data.val_split=val"], "convert again with --val-fraction 0.1"),
    ("batch-larger-than-data", lambda p: ["--data", p.tiny, "--set", "data.batch_size=1000"],
     "has 640 samples, fewer than one batch of 1000"),
    ("model-too-deep-for-images", lambda p: ["--set", "model.args.stages=6"],
     "28x28 images are too small for 6 stages (needs at least 64x64); set model.args.stages lower"),
    ("teacher-missing", lambda p: teacher("/no/teacher"), "has no model.json and model.safetensors"),
    ("teacher-class-count", lambda p: ["--data", p.c100, *teacher(p.run)],
     "predicts 10 classes but the data has 100"),
    ("teacher-image-shape", lambda p: ["--data", p.tiny, *teacher(p.run)],
     "takes images of shape [28, 28, 1] but the data has [32, 32, 3]"),
    ("teacher-architecture", lambda p: teacher(p.impostor), "do not fit its model.json"),
]


@pytest.mark.parametrize("extra, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(extra, fragment, paths):
    before = {folder: snapshot(folder) for folder in (paths.run, paths.unusable)}
    argv = ["--recipe", "mnist_cnn_smoke", "--data", paths.mnist, "--run-dir", str(paths.run), "--cpu",
            *extra(paths)]
    with pytest.raises(UserError) as info:
        run_train(argv)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    for folder, listing in before.items():
        assert snapshot(folder) == listing, f"{folder} changed"
    assert not paths.fresh.exists()


def test_cli_exits_2_with_one_error_line(paths):
    """The real command line: status 2 and exactly one `error: ...` line on stderr (the messages themselves
    are the catalogue's)."""
    before = snapshot(paths.run)
    garbage = paths.broken["garbage"]
    command = [sys.executable, "train.py", "--recipe", "mnist_cnn_smoke", "--data", garbage, "--cpu",
               "--run-dir", str(paths.run)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: {garbage}/train.beton is truncated or not a .beton file (format "
                                       "version 65535, not FFCV's 2); convert the dataset again with --force"]
    assert snapshot(paths.run) == before


def test_unwritable_run_folder_fails_before_training(paths, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = r"cannot write to run folder .*a-file/run \(Not a directory\); choose a writable --run-dir"
    with pytest.raises(UserError, match=expected):
        run_train(["--recipe", "mnist_cnn_smoke", "--data", paths.tiny, "--run-dir", str(blocker / "run"),
                   "--cpu"])
    assert blocker.read_text() == "not a folder"
