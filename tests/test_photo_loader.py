"""The photo backend (`--loader photo`, pipelines/photo_loader.py) on the real hymenoptera photos, with each of its
decoders: the compiled crop decoder and Pillow on threads, and the device path (torchvision's batched decode and
batched resizes) run on the CPU. The same seed gives the same batches, a mid-epoch resume the rest of them; the
evaluation crops take FFCV's boxes and come close to its pixels; the device path resizes as an independent
reference does; a record that fails to decode stops the run with one line naming it; fixed-size sets give the
tensor backend's batches; the refusal of a missing optional backend names this one for photos. The crop
statistics, centre crops against PIL, progressive resizing and the device ops are tests/test_photo_loaders.py's,
shared with ffcv and dali."""

from __future__ import annotations

import io
import shutil
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.fuzz import bilinear
from beton_trainer.common.errors import UserError
from beton_trainer.format import BetonFile
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import CENTER_CROP_RATIO, ResolutionSchedule
from beton_trainer.pipelines.crop_library import crop_batch, dct_scale, decode_region, resize_area
from beton_trainer.pipelines.photo_decode import MAX_SCANS, DeviceCrops, centre_boxes, pillow_crop, random_boxes
from beton_trainer.pipelines.photo_loader import PhotoLoader
from beton_trainer.trainer.syncs import no_host_sync
from tests.loader_helpers import as_pixels, options, require, require_crop_library

CPU = torch.device("cpu")
DECODERS = ("library", "pillow", "device")


@pytest.fixture(autouse=True)
def library_built(request):
    """A test of the compiled decoder needs it built (CI must have it: REQUIRE_BACKENDS=1)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("decoder") == "library":
        require_crop_library()
CHAIN = {"flip": {"p": 0.5}, "jitter": {"brightness": 0.3, "saturation": 0.3}, "erase": {"p": 0.5},
         "mix": {"mixup_alpha": 0.4}}


def photo_options(data: Path, split: str, *, train: bool, side: int = 64, batch_size: int = 16, **kw):
    return replace(options(data, split, CPU, train=train, spec=CHAIN if train else None, batch_size=batch_size,
                           num_workers=2, **kw), resolution=ResolutionSchedule(train=side, eval=side))


def epoch(loader, number: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(number, start_batch)
    return list(loader)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_same_seed_gives_the_same_batches_and_a_resume_the_rest(decoder, hymenoptera_data):
    """Two loaders, one seed: equal batches (crops, flips, jitter, erasing, MixUp), epoch after epoch; another seed
    or epoch differs; set_epoch(e, start_batch=k) yields exactly the epoch's batches from k on."""
    first = PhotoLoader(photo_options(hymenoptera_data, "train", train=True), decoder)
    second = PhotoLoader(photo_options(hymenoptera_data, "train", train=True), decoder)
    one = epoch(first, 1)
    assert len(one) == 244 // 16 and one[0][0].shape == (16, 3, 64, 64) and one[0][1].shape == (16, 2)
    assert same(one, epoch(second, 1))
    assert same(one[5:], epoch(second, 1, start_batch=5))
    assert not torch.equal(one[0][0], epoch(first, 2)[0][0])
    other_seed = PhotoLoader(photo_options(hymenoptera_data, "train", train=True, seed=1), decoder)
    assert not torch.equal(one[0][0], epoch(other_seed, 1)[0][0])


def test_eval_crops_take_ffcvs_boxes_and_come_close_to_its_pixels(hymenoptera_data, capsys):
    """The 153 test photos at 224 px: the boxes are FFCV's get_center_crop's; the pixels, against FFCV's (the
    compiled crop decoder, libjpeg's fast IDCT), differ by the decoders' rounding and filters only. Measured
    (2026-12-07, CPU-2): mean 0.005 / largest 18 levels with the compiled decoder (an enlarged crop is resized by
    bilinear in the C, not OpenCV), 1.36 / 45 with Pillow (its bilinear filter for the area average, its accurate
    IDCT), 0.95 / 21 on the device path (the area average exactly, torchvision's accurate IDCT)."""
    require("ffcv")  # compared with the ffcv backend
    require_crop_library()
    from ffcv.fields.rgb_image import get_center_crop

    beton = BetonFile(hymenoptera_data / "test.beton")
    ffcv_boxes = [get_center_crop(int(h), int(w), None, CENTER_CROP_RATIO) for h, w in beton.sizes()]
    np.testing.assert_array_equal(centre_boxes(beton.sizes()), np.array(ffcv_boxes))

    def pixels(loader) -> np.ndarray:
        return np.concatenate([as_pixels(x, loader.mean, loader.std) for x, _ in loader]).astype(int)

    opts = photo_options(hymenoptera_data, "test", train=False, side=224, batch_size=32)
    reference = pixels(build_loader("ffcv", opts))
    bounds = {"library": (0.05, 32), "pillow": (2.0, 64), "device": (1.5, 32)}  # mean, largest, in levels
    for decoder in DECODERS:
        difference = np.abs(pixels(PhotoLoader(opts, decoder)) - reference)
        with capsys.disabled():
            print(f"\n{decoder}: mean {difference.mean():.3f}, largest {difference.max()} levels from ffcv's crops")
        assert difference.mean() < bounds[decoder][0] and difference.max() <= bounds[decoder][1]


@pytest.mark.parametrize("side", [64, 224])
def test_the_library_cuts_a_chunk_in_one_call_as_record_by_record(hymenoptera_data, side):
    """crop_batch, the library path's one call per chunk, on 60 real photos with random-resized boxes: each crop
    what decode_region and resize_area give record by record (at 64 px every crop shrinks, many in the DCT), an
    enlarged one (at 224 px, 19 of them) the bilinear interpolation of the decoded crop within one level; a record
    whose bytes lie outside the file is refused alone, by position."""
    require_crop_library()
    beton = BetonFile(hymenoptera_data / "train.beton")
    idx = np.arange(60)
    sizes, out = beton.sizes()[idx], (side, side)
    boxes = random_boxes(sizes, np.random.default_rng(3))
    pointers, lengths = beton.pointers()[idx], beton.record_sizes()[idx]
    crops = np.empty((len(idx), side, side, 3), dtype=np.uint8)
    assert crop_batch(beton.mapped(), pointers, lengths, beton.jpeg_records()[idx], sizes, boxes, crops).size == 0
    enlarged = 0
    for k, i in enumerate(idx.tolist()):
        (h, w), (top, left, ch, cw) = sizes[k].tolist(), boxes[k].tolist()
        decoded, bounds = np.empty(h * w * 3, dtype=np.uint8), np.empty(6)
        assert decode_region(beton.stored_bytes(i), decoded, top, left, ch, cw, dct_scale(ch, cw, *out), bounds) == 0
        rows, cols, y0, y1, x0, x1 = bounds.tolist()
        source = decoded[:int(rows) * int(cols) * 3].reshape(int(rows), int(cols), 3)
        want = np.empty((*out, 3), dtype=np.uint8)
        if resize_area(source, y0, y1, x0, x1, want) == 0:
            np.testing.assert_array_equal(crops[k], want)
        else:
            enlarged += 1
            window = source[int(y0):int(y1), int(x0):int(x1)]
            assert np.abs(crops[k].astype(int) - bilinear(window, out)).max() <= 1
    assert enlarged == (0 if side == 64 else 19)
    pointers[7] = beton.mapped().size - 2
    assert crop_batch(beton.mapped(), pointers, lengths, beton.jpeg_records()[idx], sizes, boxes, crops).tolist() == [7]


def area_reference(image: np.ndarray, box: np.ndarray, side: int) -> np.ndarray:
    """An independent area average (each output pixel the mean of the source it covers, edge pixels by their
    covered fraction), or Pillow's bilinear resize where the crop is smaller than `side` either way."""
    top, left, h, w = (int(v) for v in box)
    if h < side or w < side:
        return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR, box=(left, top, left + w,
                                                                                           top + h)))

    def weights(start: int, extent: int, length: int) -> np.ndarray:
        m = np.zeros((side, length))
        step = extent / side
        for i in range(side):
            lo, hi = start + i * step, start + (i + 1) * step
            for j in range(int(lo), min(int(np.ceil(hi)), length)):
                m[i, j] = (min(j + 1, hi) - max(j, lo)) / step
        return m

    rows, cols = weights(top, h, image.shape[0]), weights(left, w, image.shape[1])
    return np.rint(np.stack([rows @ image[..., c] @ cols.T for c in range(3)], axis=-1)).astype(np.uint8)


@pytest.mark.parametrize("side", [224, 96])
def test_the_device_path_resizes_as_the_reference_does(hymenoptera_data, side):
    """DeviceCrops on the CPU (torchvision decodes as Pillow does there): every random-resized crop of 48 photos
    within one level of `area_reference` on the same decoded pixels, shrinking and enlarging crops both."""
    beton = BetonFile(hymenoptera_data / "train.beton")
    idx = np.arange(48)
    sizes = beton.sizes()[idx]
    boxes = random_boxes(sizes, np.random.default_rng(side))
    records = [np.asarray(beton.stored_bytes(int(i))) for i in idx]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in records])])
    geometry = torch.from_numpy(np.concatenate([sizes, boxes], axis=1).astype(np.float64))
    crops = DeviceCrops(CPU)(torch.from_numpy(np.concatenate(records)), offsets, np.ones(len(idx), dtype=bool),
                             sizes, geometry, (side, side))
    got = crops.permute(0, 2, 3, 1).numpy().astype(int)
    enlarged = 0
    for k, record in enumerate(records):
        image = np.asarray(Image.open(io.BytesIO(record.tobytes())).convert("RGB"))
        assert np.abs(got[k] - area_reference(image, boxes[k], side).astype(int)).max() <= 1, f"photo {k}"
        enlarged += int(min(boxes[k][2:]) < side)
    assert 0 < enlarged < len(idx) or side == 96


def damaged_copy(data: Path, folder: Path, record: int) -> Path:
    """`data` with record `record` of train.beton damaged after its frame header: its Huffman table claims 4,080
    codes (at most 256 exist), which every JPEG decoder refuses."""
    copy = shutil.copytree(data, folder)
    beton = BetonFile(copy / "train.beton")
    start = int(beton.pointers()[record])
    jpeg = beton.stored_bytes(record).tobytes()
    dht = jpeg.index(b"\xff\xc4")
    assert jpeg.index(b"\xff\xc0") < dht, "the frame header comes first: the reader's header check passes"
    with open(copy / "train.beton", "r+b") as fh:
        fh.seek(start + dht + 5)
        fh.write(b"\xff" * 16)
    return copy


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_record_that_fails_to_decode_stops_the_run_with_one_line_naming_it(decoder, hymenoptera_data, tmp_path):
    """With the page checksums off (as for a set converted from an already damaged source, where they match), the
    decoder's own refusal names the record; with them on, the damage is found before any decode."""
    damaged = damaged_copy(hymenoptera_data, tmp_path / "data", record=37)
    with pytest.raises(UserError, match=r"page 1 of \d+ \(records 0 to \d+; .* is not the page that was converted"):
        PhotoLoader(photo_options(damaged, "train", train=False, batch_size=8), decoder)
    loader = PhotoLoader(photo_options(damaged, "train", train=False, batch_size=8, verify="off"), decoder)
    with pytest.raises(UserError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "record 37 " in message and str(damaged / "train.beton") in message
    assert not [t for t in threading.enumerate() if t.name.startswith("photo")], "decoding threads left running"



def test_data_libjpeg_only_warns_about_stops_the_compiled_decoder(hymenoptera_data, tmp_path):
    """A record whose entropy-coded data is overwritten (markers intact) decodes in Pillow, with no error, as
    made-up pixels; the compiled decoder refuses it (issue 40), and its refusal is not handed to Pillow."""
    require_crop_library()
    copy = shutil.copytree(hymenoptera_data, tmp_path / "data")
    beton = BetonFile(copy / "train.beton")
    jpeg = beton.stored_bytes(37).tobytes()
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    with open(copy / "train.beton", "r+b") as fh:
        fh.seek(int(beton.pointers()[37]) + start)
        fh.write(b"\xff" * (len(jpeg) - start - 2))
    damaged = np.frombuffer(BetonFile(copy / "train.beton").stored_bytes(37).tobytes(), dtype=np.uint8)
    assert pillow_crop(damaged, True, tuple(beton.sizes()[37]), centre_boxes(beton.sizes()[37:38])[0],
                       (64, 64)).shape == (64, 64, 3)  # Pillow: no error
    loader = PhotoLoader(photo_options(copy, "train", train=False, batch_size=8, verify="off"), "library")
    with pytest.raises(UserError, match=r"record 37 could not be decoded \(the compiled decoder refused it"):
        list(loader)


def test_a_progressive_jpeg_of_too_many_scans_is_refused_by_every_decoder():
    """Pillow and torchvision read every scan of a progressive JPEG over every block, with no limit: each decoder
    refuses a record of more than MAX_SCANS scans before decoding it (the compiled one at its own limit)."""
    out = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    last = data[data.rfind(b"\xff\xda"):-2]  # the last scan, up to EOI
    box, size = np.array([0, 0, 64, 64]), np.array([[64, 64]])
    for extra, refused in ((MAX_SCANS - 20, False), (MAX_SCANS, True)):
        record = np.frombuffer(data[:-2] + last * extra + data[-2:], dtype=np.uint8)
        staged, offsets = torch.from_numpy(record.copy()), np.array([0, len(record)])
        if refused:
            with pytest.raises(ValueError, match=rf"a progressive JPEG of \d+ scans; at most {MAX_SCANS}"):
                pillow_crop(record, True, (64, 64), box, (32, 32))
            with pytest.raises(ValueError, match=r"scans"):
                DeviceCrops(CPU).decode(staged, offsets, np.array([True]), size)
        else:  # repeated scans: Pillow and torchvision decode them (libjpeg only warns)
            assert pillow_crop(record, True, (64, 64), box, (32, 32)).shape == (32, 32, 3)
            assert DeviceCrops(CPU).decode(staged, offsets, np.array([True]), size)[0].shape == (3, 64, 64)
    require_crop_library()
    crops = np.empty((1, 32, 32, 3), dtype=np.uint8)
    assert crop_batch(record, np.array([0]), np.array([len(record)]), np.array([True]), size, box[None],
                      crops).tolist() == [0]

def test_a_frame_header_that_lies_is_refused_before_any_decode(hymenoptera_data, tmp_path):
    copy = shutil.copytree(hymenoptera_data, tmp_path / "data")
    beton = BetonFile(copy / "train.beton")
    jpeg = beton.stored_bytes(5).tobytes()
    with open(copy / "train.beton", "r+b") as fh:
        fh.seek(int(beton.pointers()[5]) + jpeg.index(b"\xff\xc0") + 5)
        fh.write(b"\x7f\xff\x7f\xff")  # 32767 x 32767 claimed: a bomb if decoded
    with pytest.raises(UserError, match=r"record 5 holds a 32767x32767 JPEG, but the file says"):
        PhotoLoader(photo_options(copy, "train", train=True))


@pytest.mark.parametrize("decoder", DECODERS)
def test_fixed_size_sets_give_the_tensor_backends_batches(decoder, tiny_rgb_data):
    """Stored pixels are cut whole and resized by nothing, and the device ops are keyed alike: with the same seed,
    exactly the tensor backend's batches."""
    spec = {"crop": {"padding": 4}, "flip": {"p": 0.5}, "erase": {"p": 0.5}}
    opts = options(tiny_rgb_data, "train", CPU, train=True, spec=spec, batch_size=64, num_workers=2)
    tensor = build_loader("tensor", opts)
    assert same(epoch(PhotoLoader(opts, decoder), 2), epoch(tensor, 2))


def test_one_channel_arrays_are_refused_in_one_line(mnist_data):
    with pytest.raises(UserError, match=r"holds one-channel arrays, which the photo loader does not decode; use "
                                        r"--loader tensor$"):
        build_loader("photo", options(mnist_data, "train", CPU, train=True))


def test_a_missing_optional_backend_names_photo_for_photos_and_tensor_else(hymenoptera_data, tiny_rgb_data,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now fails, as where it is not installed
    for data, core in ((hymenoptera_data, "photo"), (tiny_rgb_data, "tensor")):
        with pytest.raises(UserError) as info:
            build_loader("ffcv", options(data, "train", CPU, train=True))
        message = str(info.value)
        assert "\n" not in message and "pip install .[ffcv]" in message and message.endswith(f"--loader {core}")


def test_cuda_batches_never_sync_and_repeat(hymenoptera_data, cuda_device):
    """On a GPU: nvJPEG decodes, the loop's steady state passes CUDA's sync debug mode, two runs are equal, and the
    crops are those of the same path on the CPU within the decoders' rounding."""
    opts = replace(photo_options(hymenoptera_data, "train", train=True), device=cuda_device)
    batches = iter(PhotoLoader(opts))
    next(batches)
    with no_host_sync(cuda_device):
        for _ in range(5):
            images, targets = next(batches)
    batches.close()
    assert images.device.type == "cuda" and images.shape == (16, 3, 64, 64)
    gpu = [x.cpu() for x, _ in epoch(PhotoLoader(opts), 1)[:3]]
    assert all(torch.equal(a, b.cpu()) for a, (b, _) in zip(gpu, epoch(PhotoLoader(opts), 1)[:3]))
    cpu = [x for x, _ in epoch(PhotoLoader(photo_options(hymenoptera_data, "train", train=True), "device"), 1)[:3]]
    assert all((a - b).abs().mean() < 0.1 for a, b in zip(gpu, cpu))
