"""The exported model stands alone: model.safetensors + model.json, read by a plain torchvision script that
decodes the original image files with PIL, predict what the project predicts through its own loaders."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions
from beton_trainer.trainer.modelio import make_model
from tests.train_helpers import run_train

PER_CLASS = 10  # test images of each class given to both

# Uses nothing of this project: torchvision's resnet18 changed as model.json's name says (resnet18_cifar:
# 3x3 stride-1 stem, no max-pool, dropout + linear head), and the preprocessing model.json records.
PLAIN_SCRIPT = '''
import json, sys
import numpy as np, torch, torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn

run, paths = sys.argv[1], sys.argv[2:]
info = json.load(open(f"{run}/model.json"))
assert info["name"] == "resnet18_cifar" and info["layout"] == "NCHW"
model = torchvision.models.resnet18()
model.conv1 = nn.Conv2d(len(info["mean"]), 64, 3, 1, 1, bias=False)
model.maxpool = nn.Identity()
model.fc = nn.Sequential(nn.Dropout(), nn.Linear(512, info["num_classes"]))
model.load_state_dict(load_file(f"{run}/model.safetensors"))
height, width = info["input_size"]

def tensor(path):
    image = Image.open(path).convert(info["channels"])
    if info["center_crop_fraction"]:
        side = round(min(image.size) * info["center_crop_fraction"])
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32).reshape(height, width, -1) * info["scale"]
    x = (x - np.asarray(info["mean"], dtype=np.float32)) / np.asarray(info["std"], dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)

with torch.no_grad():
    predicted = model.eval()(torch.stack([tensor(p) for p in paths])).argmax(1)
print(json.dumps([info["classes"][i] for i in predicted]))
'''


def sample_images(tarball: Path, out: Path) -> tuple[list[Path], list[int]]:
    """The first PER_CLASS test JPEGs of each class (by name), written out as files, and their record numbers
    in test.beton (the converter orders records by class, then path; 1,000 test images a class)."""
    with tarfile.open(tarball, "r:xz") as tar:
        members = [m for m in tar if m.isfile() and m.name.split("/")[1] == "test"]
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for member in members:
            by_class.setdefault(member.name.split("/")[2], []).append(member)
        paths, records = [], []
        for label, name in enumerate(sorted(by_class)):
            for rank, member in enumerate(sorted(by_class[name], key=lambda m: m.name)[:PER_CLASS]):
                path = out / f"{name}-{Path(member.name).name}"
                path.write_bytes(tar.extractfile(member).read())
                paths.append(path)
                records.append(label * 1000 + rank)
    return paths, records


def test_plain_torchvision_script_predicts_what_the_project_predicts(cifar10_data, real_data_root, tmp_path):
    run_dir = tmp_path / "run"
    run_train(["--recipe", "c10_cnn_smoke", "--data", str(cifar10_data), "--run-dir", str(run_dir), "--cpu",
               "--set", "model.name=resnet18_cifar", "--set", "model.args={}", "--set", "phases.0.epochs=1",
               "--set", "max_steps_per_epoch=15", "--set", "data.eval_batch_size=64", "--set", "max_eval_batches=1",
               "--set", "tensorboard=false"])
    info = json.loads((run_dir / "model.json").read_text())
    manifest = json.loads((cifar10_data / "manifest.json").read_text())
    assert (info["mean"], info["std"]) == (manifest["mean"], manifest["std"])
    assert (info["channels"], info["input_size"], info["center_crop_fraction"]) == ("RGB", [32, 32], None)

    files, records = sample_images(real_data_root / "cifar10-jpeg.tar.xz", tmp_path)
    # the project: its tensor loader over test.beton (normalising with the manifest's statistics), its model
    loader = build_loader("tensor", LoaderOptions(data_dir=cifar10_data, split="test", train=False,
                                                  spec=AugmentSpec(), batch_size=1000, device=torch.device("cpu")))
    loader.set_epoch(0)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])[records]
    labels = torch.cat([b[1] for b in batches])[records]
    raw = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
                       for f in files]).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(info[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert labels.tolist() == [r // 1000 for r in records]  # the files are those records
    assert torch.allclose(images, (raw - mean) / std, atol=1e-5)
    model = make_model(info)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    with torch.no_grad():
        logits = model.eval()(images)
    project = [info["classes"][i] for i in logits.argmax(1)]
    assert len(set(project)) >= 3  # a model whose answers depend on the image
    with torch.no_grad():  # and on the normalisation: without it some answers change
        assert (model(raw).argmax(1) != logits.argmax(1)).any()

    script = tmp_path / "predict.py"
    script.write_text(PLAIN_SCRIPT)
    out = subprocess.run([sys.executable, "-I", str(script), str(run_dir), *map(str, files)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == project
