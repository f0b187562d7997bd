"""The device-resident tensor loader: exact pixels, every sample once, reproducible and resumable
order, disjoint rank shards; on the test device (`--device` / TEST_DEVICE, tests/conftest.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.common.errors import UserError
from beton_trainer.common.schema import from_dict
from beton_trainer.format.beton import page_size_for, write_beton_file
from beton_trainer.pipelines.augment import AugmentSpec
from beton_trainer.pipelines.base import LoaderOptions
from beton_trainer.pipelines.tensor_loader import TensorLoader

N, H, W, C = 103, 8, 6, 3
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
AUGMENT = {"crop": {"padding": 2}, "flip": {"p": 0.5}, "jitter": {"brightness": 0.3},
           "erase": {"p": 0.5}, "mix": {"mixup_alpha": 0.5, "cutmix_alpha": 1.0}}


def arrays(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images; the label of sample i is i, so every output names its source."""
    images = np.random.default_rng(0).integers(0, 256, (n, H, W, C), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64)


def loader(train: bool, device: torch.device, *, spec: AugmentSpec | None = None, batch_size: int = 10,
           rank: int = 0, world_size: int = 1, seed: int = 0, n: int = N) -> TensorLoader:
    options = LoaderOptions(data_dir=Path("unused"), split="train" if train else "test", batch_size=batch_size,
                            train=train, spec=spec or AugmentSpec(), device=device, seed=seed,
                            rank=rank, world_size=world_size)
    images, labels = arrays(n)
    return TensorLoader.from_arrays(images, labels, mean=MEAN, std=STD, num_classes=n, options=options)


def expected(labels: torch.Tensor) -> torch.Tensor:
    """What normalize must give for these samples, computed independently of the loader (on the CPU)."""
    images = torch.from_numpy(arrays()[0]).permute(0, 3, 1, 2)[labels.cpu()].float()
    return (images / 255 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def labels_of(batches) -> list[int]:
    return [int(v) for _, labels in batches for v in labels]


@pytest.mark.parametrize("train", [True, False])
def test_identity_spec_gives_stored_pixels_each_sample_once(train, device):
    data = loader(train, device)
    batches = list(data)
    assert len(batches) == len(data) == (10 if train else 11)
    for images, labels in batches:
        assert images.dtype == torch.float32 and images.device.type == labels.device.type == device.type
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
        torch.testing.assert_close(images.cpu(), expected(labels), rtol=0, atol=1e-6)
    seen = labels_of(batches)
    if train:
        assert [len(b[1]) for b in batches] == [10] * 10
        assert len(set(seen)) == 100  # drop_last: a multiple of the batch, no repeats
    else:
        assert seen == list(range(N)) and len(batches[-1][1]) == 3


def test_split_is_stored_once_on_the_device_as_nchw_uint8(device):
    data = loader(True, device)
    assert data.images.dtype == torch.uint8 and data.images.shape == (N, C, H, W)
    assert data.images.is_contiguous() and data.images.device.type == device.type
    assert torch.equal(data.images.permute(0, 2, 3, 1).cpu(), torch.from_numpy(arrays()[0]))


def test_same_seed_same_batches_other_epoch_other_order(device):
    spec = from_dict(AugmentSpec, AUGMENT)
    a, b = loader(True, device, spec=spec), loader(True, device, spec=spec)
    for (xa, ta), (xb, tb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
        assert ta.shape == (10, N) and xa.is_contiguous(memory_format=torch.channels_last)
    plain = loader(True, device)
    first = labels_of(plain)
    plain.set_epoch(1)
    second = labels_of(plain)
    assert first != second
    assert labels_of(loader(True, device, seed=1)) != first


def test_ranks_get_disjoint_shards(device):
    train = [labels_of(loader(True, device, rank=r, world_size=2)) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 50  # 103 // (2 * 10) batches of 10 per rank
    assert not set(train[0]) & set(train[1]) and len(set(train[0]) | set(train[1])) == 100
    evals = [labels_of(loader(False, device, rank=r, world_size=2)) for r in range(2)]
    assert not set(evals[0]) & set(evals[1])
    assert sorted(evals[0] + evals[1]) == list(range(N))
    assert [len(list(loader(False, device, rank=r, world_size=2, batch_size=17))) for r in range(2)] == [4, 3]
    assert [len(loader(False, device, rank=r, world_size=2, batch_size=17)) for r in range(2)] == [4, 3]  # 52, 51


def test_resume_mid_epoch_yields_the_remaining_batches_exactly(device):
    spec = from_dict(AugmentSpec, AUGMENT)
    full = loader(True, device, spec=spec)
    full.set_epoch(3)
    whole = list(full)
    resumed = loader(True, device, spec=spec)
    resumed.set_epoch(3, start_batch=4)
    rest = list(resumed)
    assert len(rest) == len(whole) - 4
    for (xa, ta), (xb, tb) in zip(whole[4:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert len(list(resumed)) == len(whole)  # the start offset applies to one pass only


def test_too_small_split_for_one_batch_is_a_user_error(device):
    with pytest.raises(UserError, match="batch_size"):
        loader(True, device, batch_size=64, world_size=2)


def test_real_mnist_digits_round_trip(real_data_root, device):
    n = 256
    with gzip.open(real_data_root / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(16 + n * 784)[16:], dtype=np.uint8).reshape(n, 28, 28, 1).copy()
    with gzip.open(real_data_root / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(8 + n)[8:], dtype=np.uint8).astype(np.int64)
    options = LoaderOptions(data_dir=real_data_root, split="test", batch_size=100, train=False,
                            spec=AugmentSpec(), device=device)
    data = TensorLoader.from_arrays(images, labels, mean=(0.1307,), std=(0.3081,), num_classes=10, options=options)
    out = torch.cat([x for x, _ in data]).cpu()
    assert torch.equal(torch.cat([y for _, y in data]).cpu(), torch.from_numpy(labels))
    ref = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    train = TensorLoader.from_arrays(images, labels, mean=(0.1307,), std=(0.3081,), num_classes=10,
                                     options=LoaderOptions(data_dir=real_data_root, split="train", batch_size=64,
                                                           train=True, spec=from_dict(AugmentSpec, {
                                                               "crop": {"padding": 2},
                                                               "affine": {"degrees": 15, "translate": 0.1}}),
                                                           device=device))
    for x, y in train:
        assert x.shape == (64, 1, 28, 28) and torch.isfinite(x).all() and y.dtype == torch.int64
        assert x.device.type == y.device.type == device.type


def test_constructor_opens_the_split_and_uses_its_statistics(tmp_path, device):
    """From a real .beton and manifest (no arrays passed): the file's pixels, chunk by chunk, normalized with the
    manifest's statistics."""
    images, labels = arrays()
    write_beton_file(tmp_path / "test.beton", images, {"label": labels}, jpeg=np.zeros(N, dtype=bool),
                     page_size=page_size_for(images[0].nbytes))
    size = (tmp_path / "test.beton").stat().st_size
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format_version": 1, "splits": {"test": {"count": N, "bytes": size}}, "image_shape": [H, W, C],
        "classes": [str(i) for i in range(N)], "mean": list(MEAN), "std": list(STD)}))
    options = LoaderOptions(data_dir=tmp_path, split="test", batch_size=50, train=False, spec=AugmentSpec(),
                            device=device)
    data = TensorLoader(options)
    assert len(data) == 3 and sum(len(y) for _, y in data) == N
    for x, y in data:
        torch.testing.assert_close(x.cpu(), expected(y), rtol=0, atol=1e-6)
