"""Shared fixtures. Real data comes from $DATA_ROOT; with REQUIRE_REAL_DATA=1 (CI) its absence fails.

The loader and augmentation tests run on the device `--device` (or $TEST_DEVICE) names, the CPU by default;
asking for CUDA where torch sees none stops the session before any test runs, so a GPU machine whose CUDA
is broken never passes the CPU tests in its place. Tests that need CUDA take `cuda_device` and skip without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # torch is imported by the fixtures that need it: collecting stays light
    import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEVICES = ("cpu", "cuda")
DEVICE = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", choices=DEVICES, default=None,
                     help="device of the loader and augmentation tests (default: $TEST_DEVICE, else cpu)")


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--device") or os.environ.get("TEST_DEVICE") or "cpu"
    if name not in DEVICES:
        raise pytest.UsageError(f"TEST_DEVICE={name!r} is not a test device; use one of {', '.join(DEVICES)}")
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("the tests were asked to run on CUDA (--device / TEST_DEVICE) but torch sees no "
                                    "CUDA device; run them on a GPU machine, or without it on the CPU")
    config.stash[DEVICE] = name


@pytest.fixture(scope="session", autouse=True)
def own_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs (and the processes they start) remember dataset identities under $XDG_CACHE_HOME: the suite's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device the loader and augmentation tests put their tensors on."""
    import torch

    return torch.device(pytestconfig.stash[DEVICE])


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """CUDA device 0 for tests that only mean something there; they skip without CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder named by DATA_ROOT (mnist/ and cifar10-jpeg.tar.xz inside)."""
    root = os.environ.get("DATA_ROOT")
    if root and Path(root).is_dir():
        return Path(root).resolve()
    message = f"real data not found: set DATA_ROOT to the shared data folder (got {root!r})"
    if os.environ.get("REQUIRE_REAL_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mnist_data(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MNIST converted (ndarray storage, train 60,000 / test 10,000): the folder holding manifest.json."""
    from beton_trainer.convert import convert_dataset

    return convert_dataset("mnist", real_data_root / "mnist", tmp_path_factory.mktemp("mnist-data"))


@pytest.fixture(scope="session")
def cifar10_data(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared CIFAR-10 JPEG tarball converted with raw storage (train 50,000 / test 10,000); ~20-30 s."""
    from beton_trainer.convert import convert_dataset

    return convert_dataset("imagefolder", real_data_root / "cifar10-jpeg.tar.xz",
                           tmp_path_factory.mktemp("cifar10-data"))


@pytest.fixture(scope="session")
def hymenoptera_data(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared hymenoptera tarball converted as ffcv-imagenet stores photos (JPEG quality 90, longer side at
    most 500): train 244 (its one GIF skipped) / test 153 (from val/), varied sizes; ~15 s."""
    from beton_trainer.convert import convert_dataset

    return convert_dataset("imagefolder", real_data_root / "hymenoptera_data.tar",
                           tmp_path_factory.mktemp("hymenoptera-data"), name="hymenoptera", encode="jpg",
                           max_side=500, quality=90)


@pytest.fixture(scope="session")
def tiny_rgb_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CIFAR-like set (10 classes, 32x32 RGB, train 640 / test 200) through the cifar10 pickle path."""
    from beton_trainer.convert import convert_dataset
    from tests.data_fixtures import write_cifar10

    source = write_cifar10(tmp_path_factory.mktemp("tiny-rgb-source"), batch_size=128, n_test=200, seed=7)
    return convert_dataset("cifar10", source["folder"], tmp_path_factory.mktemp("tiny-rgb-data"))
