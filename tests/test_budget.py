"""Each backend states its memory need from the .beton's header and, over the budget, stops before loading with
one line giving both figures and what fits; on real MNIST (47 MB of pixels) and hymenoptera (JPEG photos)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import BetonFile
from beton_trainer.pipelines import budget, build_loader
from beton_trainer.pipelines.base import ResolutionSchedule
from beton_trainer.pipelines.photo_loader import PREFETCH, PhotoLoader
from tests.loader_helpers import installed, options, require

ROOT = Path(__file__).resolve().parents[1]
MNIST_PIXELS = 60_000 * 28 * 28


def refusal(backend: str, data_dir: Path, device, **kw) -> str:
    with pytest.raises(UserError) as info:
        build_loader(backend, options(data_dir, "train", device, train=True, **kw))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tensor_refuses_over_the_recipe_budget_and_fits_under_it(mnist_data, device):
    message = refusal("tensor", mnist_data, device, memory_budget_gb=0.04)
    where = "the host" if device.type == "cpu" else str(device)
    assert message.startswith(f"the tensor loader needs 0.0535 GB on {where} (60,000 decoded images and one chunk of "
                              "4096 in staging) but 0.04 GB is free (memory budget 0.04 GB: data.memory_budget_gb "
                              "or BETON_MEMORY_BUDGET_GB); use --loader ffcv")
    loader = build_loader("tensor", options(mnist_data, "train", device, train=True, memory_budget_gb=0.06))
    assert loader.memory.device_bytes + loader.memory.host_bytes == MNIST_PIXELS + 2 * 4096 * 784


def test_the_environment_variable_caps_free_memory(mnist_data, device, monkeypatch):
    monkeypatch.setenv(budget.BUDGET_ENV, "0.02")
    assert "but 0.02 GB is free" in refusal("tensor", mnist_data, device)
    monkeypatch.setenv(budget.BUDGET_ENV, "lots")
    assert refusal("tensor", mnist_data, device) == ("BETON_MEMORY_BUDGET_GB='lots' is not a positive number of GB; "
                                                     "set it to e.g. 16, or unset it")


def test_free_host_memory_from_proc_or_the_budget_alone(monkeypatch, tmp_path):
    assert budget.host_free() is None or budget.host_free() > 0
    monkeypatch.setattr(budget, "MEMINFO", tmp_path / "absent")  # no /proc: the budget alone counts
    assert budget.host_free() is None and budget.free_host() is None and budget.free_host(2.0) == 2e9
    need = budget.MemoryNeed("tensor", 0, int(3e9), "test")
    budget.check(need, torch.device("cpu"), 0.0, "fix")  # nothing to compare with: no refusal
    with pytest.raises(UserError, match="needs 3 GB on the host .* but 2 GB is free"):
        budget.check(need, torch.device("cpu"), 2.0, "fix")


def fake_cgroup(tmp_path, monkeypatch, proc_line: str, files: dict[str, str]) -> None:
    """A /proc/self/cgroup line and cgroup files under a fake /sys/fs/cgroup (paths relative to it)."""
    (tmp_path / "proc").write_text(proc_line + "\n")
    for rel, text in files.items():
        (tmp_path / "sys" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / rel).write_text(text)
    monkeypatch.setattr(budget, "PROC_CGROUP", tmp_path / "proc")
    monkeypatch.setattr(budget, "CGROUP_ROOT", tmp_path / "sys")


def test_a_memory_cgroup_limit_counts_as_what_is_free(monkeypatch, tmp_path):
    """A SLURM job or a container has less than the host's MemAvailable: its cgroup's limit less what it uses
    that cannot be reclaimed (inactive page cache can). v2 and v1 layouts, the innermost limit or one above it;
    no limit anywhere ("max", v1's 2^63) leaves MemAvailable alone."""
    gib = 1 << 30
    fake_cgroup(tmp_path, monkeypatch, "0::/job/step", {
        "job/memory.max": str(4 * gib), "job/memory.current": str(3 * gib),
        "job/memory.stat": f"anon {2 * gib}\ninactive_file {gib // 2}\n",
        "job/step/memory.max": "max", "job/step/memory.current": str(3 * gib)})
    assert budget.cgroup_free() == int(1.5 * gib)  # 4 GiB - (3 GiB - 0.5 GiB inactive)
    assert budget.host_free() == int(1.5 * gib)  # far below this machine's MemAvailable
    need = budget.MemoryNeed("tensor", 0, 2 * gib, "the decoded split")
    with pytest.raises(UserError, match="needs 2.15 GB on the host .* but 1.61 GB is free; fix"):
        budget.check(need, torch.device("cpu"), 0.0, "fix")

    fake_cgroup(tmp_path, monkeypatch, "4:memory:/bench", {
        "memory/bench/memory.limit_in_bytes": str(3 * gib), "memory/bench/memory.usage_in_bytes": str(gib),
        "memory/memory.limit_in_bytes": str((1 << 63) - 4096), "memory/memory.usage_in_bytes": str(9 * gib)})
    assert budget.cgroup_free() == 2 * gib  # v1, no memory.stat: usage counted whole

    fake_cgroup(tmp_path, monkeypatch, "0::/free", {"free/memory.max": "max", "free/memory.current": "1"})
    assert budget.cgroup_free() is None and budget.host_free() > 0
    monkeypatch.setattr(budget, "PROC_CGROUP", tmp_path / "absent")
    assert budget.cgroup_free() is None


def test_dali_refuses_its_host_arrays(mnist_data, device):
    if not installed("nvidia.dali"):
        pytest.skip("DALI is not installed")
    message = refusal("dali", mnist_data, device, memory_budget_gb=0.03)
    assert message.startswith("the dali loader needs 0.047 GB on the host (60,000 decoded images as host arrays) "
                              "but 0.03 GB is free")
    assert message.endswith("use --loader ffcv, which reads the .beton as it goes (with data.order = \"page_aware\" "
                            "for a set larger than RAM)")


def test_ffcv_random_order_refuses_then_page_aware_fits(mnist_data, device):
    """The random order with os_cache needs the whole file in the page cache; the page-aware order with os_cache
    off needs two blocks of pages (here 4 of 2 MiB) and FFCV's batches in flight; a block too large for the
    budget is refused with its own fix."""
    require("ffcv")
    size = (mnist_data / "train.beton").stat().st_size
    message = refusal("ffcv", mnist_data, device, order="random", memory_budget_gb=0.03)
    assert message.startswith(f"the ffcv loader needs {budget.gb(size + 5 * 64 * 784)} on the host (the .beton in "
                              "the page cache (os_cache, random order) and its batches in flight) but 0.03 GB")
    assert message.endswith(f"; {budget.PAGE_AWARE_FIX}")
    assert "but 0.03 GB" in refusal("ffcv", mnist_data, device, order="random", os_cache=False,
                                    memory_budget_gb=0.03)  # FFCV's own cache would hold every page
    loader = build_loader("ffcv", options(mnist_data, "train", device, train=True, order="page_aware",
                                          block_pages=2, memory_budget_gb=0.03))
    assert loader.memory.host_bytes == 4 * (2 << 20) + 5 * 64 * 784 and not loader.os_cache
    assert refusal("ffcv", mnist_data, device, order="page_aware", block_pages=2, memory_budget_gb=0.005) \
        .endswith("; lower data.order_block_pages (now 2) or data.batch_size")


def test_auto_order_turns_page_aware_when_the_file_exceeds_half_the_budget(mnist_data, device):
    require("ffcv")
    large = build_loader("ffcv", options(mnist_data, "train", device, train=True, memory_budget_gb=0.09))
    assert large.pages is not None and not large.os_cache  # a 0.051 GB file > 0.5 x 0.09 GB
    small = build_loader("ffcv", options(mnist_data, "train", device, train=True, memory_budget_gb=0.12))
    assert small.pages is None and small.os_cache


def test_jpeg_need_is_the_decoded_size(hymenoptera_data, device):
    """For JPEG records the need is what they decode to (sum of h * w * 3 from the header); the DALI photo path,
    reading through the page cache in random order, is refused naming the page-aware ffcv order."""
    beton = BetonFile(hymenoptera_data / "train.beton")
    assert budget.decoded_bytes(beton) == sum(beton.image(i).nbytes for i in range(len(beton)))
    if installed("nvidia.dali"):
        assert refusal("dali", hymenoptera_data, device, batch_size=4, memory_budget_gb=0.001) \
            .endswith(f"; {budget.PAGE_AWARE_FIX}")


def test_photo_counts_the_file_its_batches_and_its_decoding(hymenoptera_data):
    """The photo backend on the host: the .beton through the page cache (random order), PREFETCH + 1 batches of
    crops and each thread's record decoded whole (4 bytes a pixel, as Pillow holds RGB); on the device path, the
    pinned records of PREFETCH + 1 batches on the host and a batch decoded (and a chunk resizing) on the device.
    Over the budget: one line with both figures and the fix."""
    cpu = torch.device("cpu")
    beton = BetonFile(hymenoptera_data / "train.beton")
    pixels, crops = np.prod(beton.sizes(), axis=1), (PREFETCH + 1) * 8 * 224 * 224 * 3
    host = build_loader("photo", options(hymenoptera_data, "train", cpu, train=True, batch_size=8, num_workers=2))
    assert host.memory.device_bytes == 0
    assert host.memory.host_bytes == beton.path.stat().st_size + crops + 2 * int(pixels.max()) * 4
    device = PhotoLoader(options(hymenoptera_data, "train", cpu, train=True, batch_size=8), "device")
    assert device.memory.host_bytes == beton.path.stat().st_size + (PREFETCH + 1) * budget.largest_batch(
        beton.record_sizes(), 8)
    assert device.memory.device_bytes > budget.largest_batch(pixels, 8) * 3 + crops
    message = refusal("photo", hymenoptera_data, cpu, batch_size=8, memory_budget_gb=0.001)
    assert message.startswith("the photo loader needs ") and message.endswith(f"; {budget.PHOTO_FIX}")


def test_cuda_device_memory_is_checked(mnist_data, cuda_device):
    free = torch.cuda.mem_get_info(cuda_device)[0]
    message = refusal("tensor", mnist_data, cuda_device, memory_budget_gb=0.04)
    assert f"on {cuda_device}" in message and free > 0


def test_the_recipe_key_refuses_through_train_py(mnist_data):
    """The real command line: status 2 and the one refusal line, before any loading or training."""
    command = [sys.executable, "train.py", "--recipe", "mnist_cnn_smoke", "--data", str(mnist_data), "--cpu",
               "--set", "data.memory_budget_gb=0.01"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: the tensor loader needs 0.0535 GB on the host")
    assert np.isfinite(float(lines[0].split("needs ")[1].split(" GB")[0]))


# ---- issue 40, finding 4: the decode buffers of the largest image a file's headers allow ----

def claim_huge_images(data: Path, records: list[int], side: int = 9459) -> int:
    """Records `records` of train.beton replaced by one small progressive JPEG whose frame claims side x side
    pixels (89.5 megapixels, under the pixel cap), the metadata and allocation table saying the same, so every
    header check passes; the manifest kept in step (a careful forger). Returns the JPEG's size."""
    from PIL import Image

    from beton_trainer.format.beton import ALLOC
    from tests.test_crafted_beton import Layout, keep_manifest_in_step

    out = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out, "JPEG", progressive=True, quality=50)
    jpeg = bytearray(out.getvalue())
    sof = jpeg.find(b"\xff\xc2")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    beton, layout = BetonFile(data / "train.beton"), Layout(data / "train.beton")
    table = np.fromfile(layout.path, dtype=ALLOC, offset=layout.table_ptr)
    for i in records:
        ptr = int(beton.pointers()[i])
        layout.write(ptr, bytes(jpeg))
        layout.table_entry(int(np.flatnonzero(table["ptr"] == ptr)[0]), "size", len(jpeg))
        layout.sample_field(i, "image", side, "height")
        layout.sample_field(i, "image", side, "width")
    keep_manifest_in_step(data)
    return len(jpeg)


def test_ffcv_counts_the_decode_buffers_of_the_largest_image_the_headers_allow(hymenoptera_data, tmp_path, device):
    """Eight records replaced by a ~500-byte progressive JPEG claiming 9459 x 9459 raised an ffcv run's peak from
    1.53 to 2.4 GB, uncounted, and one run in seven failed in FFCV's allocation with a traceback: FFCV sets aside
    the largest image (max height x max width x 3) for every image in flight, and libjpeg a progressive image's
    coefficients in each worker. The budget now counts both, and names --max-side as the fix."""
    require("ffcv")
    data = Path(shutil.copytree(hymenoptera_data, tmp_path / "claims"))
    assert claim_huge_images(data, list(range(8))) < 1000
    kw = dict(batch_size=16, num_workers=2, resolution=ResolutionSchedule(train=64, eval=64), memory_budget_gb=4)
    message = refusal("ffcv", data, device, **kw)
    decode = 9459 * 9459 * (3 * 5 * 16 + 6 * 2)
    assert f"and {budget.gb(decode)} of decode buffers for images of up to 9459x9459) but 4 GB is free" in message
    assert message.endswith("; convert the photos again with a smaller --max-side (and --force), or lower "
                            "data.batch_size: FFCV sets aside room for the largest image the file's headers allow "
                            "(9459x9459) for every image in flight")
    real = build_loader("ffcv", options(hymenoptera_data, "train", device, train=True, **kw))  # the control
    height, width = budget.largest_image(BetonFile(hymenoptera_data / "train.beton"))
    assert max(height, width) == 500 and real.memory.host_bytes >= height * width * (3 * 5 * 16 + 6 * 2)


ALLOCATOR = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 21474836480 bytes. Error code 12 "
             "(Cannot allocate memory)")


def test_a_failed_allocation_in_a_loader_is_one_line(mnist_data, hymenoptera_data, device, monkeypatch, capfd):
    """What memory other processes take after the budget check can still make an allocation fail: in FFCV's epoch
    set-up, in its worker thread, or in the tensor loader's upload. Each is one line, without a traceback."""
    def failing(*args, **kwargs):
        raise RuntimeError(ALLOCATOR)

    expected = f"the {{}} loader could not allocate its memory ({ALLOCATOR}); "
    real_empty = torch.empty
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: failing() if np.prod(a[0]) > 1e7 else real_empty(*a, **k))
        with pytest.raises(UserError) as caught:
            build_loader("tensor", options(mnist_data, "train", device, train=True))
    assert str(caught.value) == expected.format("tensor") + budget.USE_FFCV
    if not installed("ffcv"):
        return
    import ffcv.pipeline.graph
    from ffcv.loader.epoch_iterator import EpochIterator

    photos = dict(batch_size=16, resolution=ResolutionSchedule(train=64, eval=64))
    for target, name in ((ffcv.pipeline.graph, "allocate_query"), (EpochIterator, "run_pipeline")):
        loader = build_loader("ffcv", options(hymenoptera_data, "train", device, train=True, **photos))
        with monkeypatch.context() as patch:
            patch.setattr(target, name, failing)
            with pytest.raises(UserError) as caught:
                list(loader)
        assert str(caught.value) == expected.format("ffcv") + budget.ALLOCATION_FIX
        assert "Traceback" not in capfd.readouterr().err
