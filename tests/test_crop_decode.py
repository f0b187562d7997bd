"""The C behind the FFCV backend's crop decoders (pipelines/crop_decode.c), on the real hymenoptera photos (up to
2592x1944, as the tarball holds them): a region decoded alone equals the same pixels of FFCV's whole-image
decode; shrunk by 2, 4 or 8 it equals libjpeg's shrunk whole-image decode there; damaged input and a too-small
buffer are refused, never written past; the area resize equals OpenCV's INTER_AREA, fractional bounds
included; and the centre-crop decoder's batches equal FFCV's own decoder's at full scale, and are as close to
PIL's as FFCV's when shrunk in the DCT. The loaders' crop positions, statistics and centre crops against PIL
are in tests/test_photo_loaders.py."""

from __future__ import annotations

import io
import tarfile

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.loader_helpers import require

require("ffcv")

from ffcv.fields.rgb_image import get_center_crop  # noqa: E402
from ffcv.libffcv import imdecode  # noqa: E402

from beton_trainer.format import BetonFile  # noqa: E402
from beton_trainer.pipelines.base import CENTER_CROP_RATIO  # noqa: E402
from beton_trainer.pipelines.crop_decode import CenterCropDecoder  # noqa: E402
from beton_trainer.pipelines.crop_library import dct_scale, decode_region, resize_area  # noqa: E402


@pytest.fixture(scope="module")
def jpegs(real_data_root) -> list[np.ndarray]:
    """Twelve real photos' JPEG bytes (both classes, several sizes, the cameras' chroma subsampling), each
    followed by its copy as the converter stores it (quality 90, 4:2:0 chroma, the longer side at most 500)."""
    with tarfile.open(real_data_root / "hymenoptera_data.tar") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.lower().endswith(".jpg") and "/train/" in m.name)
        originals = [tar.extractfile(name).read() for name in names[::20][:12]]
    out = []
    for data in originals:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((500, 500))
        stored = io.BytesIO()
        image.save(stored, format="JPEG", quality=90, subsampling="4:2:0")
        out += [np.frombuffer(data, dtype=np.uint8), np.frombuffer(stored.getvalue(), dtype=np.uint8)]
    return out


def size(jpeg: np.ndarray) -> tuple[int, int]:
    """(height, width) from the JPEG header."""
    w, h = Image.open(io.BytesIO(jpeg.tobytes())).size
    return h, w


def region(jpeg: np.ndarray, top: int, left: int, height: int, width: int, denom: int = 1) -> np.ndarray:
    """decode_region's output cut to the whole pixels that hold the crop (all of it at full scale), after checking
    the exact bounds it reports: the crop's size over `denom`, starting at the fraction of a pixel it does."""
    h, w = size(jpeg)
    out = np.full(h * w * 3 + 1, 7, dtype=np.uint8)
    bounds = np.zeros(6)
    assert decode_region(jpeg, out, top, left, height, width, denom, bounds) == 0
    rows, cols = int(bounds[0]), int(bounds[1])
    assert out[rows * cols * 3:].tolist() == [7] * (len(out) - rows * cols * 3), "wrote past its rows"
    y_begin, y_end, x_begin, x_end = bounds[2:]
    assert y_begin == top / denom - top // denom and y_end - y_begin == height / denom
    assert x_begin % 1 == (left / denom) % 1 and x_end - x_begin == width / denom
    pixels = out[:rows * cols * 3].reshape(rows, cols, 3)
    return pixels[int(y_begin):int(np.ceil(y_end)), int(x_begin):int(np.ceil(x_end))]


def test_a_region_equals_the_same_pixels_of_the_whole_decode(jpegs):
    rng = np.random.default_rng(0)
    sizes = set()
    for jpeg in jpegs:
        h, w = size(jpeg)
        sizes.add((h, w))
        whole = np.empty((h, w, 3), dtype=np.uint8)
        imdecode(jpeg, whole, h, w, h, w, 0, 0, 1, 1, False, False)  # what FFCV's own decoders do
        regions = [(0, 0, h, w), (h - 9, w - 13, 9, 13), (0, w // 2, h // 3, w // 2)]
        for _ in range(4):
            rh, rw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            regions.append((int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1)), rh, rw))
        for top, left, rh, rw in regions:
            np.testing.assert_array_equal(region(jpeg, top, left, rh, rw), whole[top:top + rh, left:left + rw],
                                          err_msg=f"{h}x{w} photo, region {top, left, rh, rw}")
    assert len(sizes) > 3


@pytest.mark.parametrize("denom", [2, 4, 8])
def test_a_shrunk_region_equals_the_shrunk_whole_decode(jpegs, denom):
    rng = np.random.default_rng(denom)
    for jpeg in jpegs[:8]:
        h, w = size(jpeg)
        whole = region(jpeg, 0, 0, h, w, denom)
        assert whole.shape == (-(-h // denom), -(-w // denom), 3)  # libjpeg rounds the shrunk size up
        for _ in range(4):
            rh, rw = int(rng.integers(8 * denom, h + 1)), int(rng.integers(8 * denom, w + 1))
            top, left = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
            y0, x0, y1, x1 = top // denom, left // denom, -(-(top + rh) // denom), -(-(left + rw) // denom)
            np.testing.assert_array_equal(region(jpeg, top, left, rh, rw, denom), whole[y0:y1, x0:x1])


def test_dct_scale_shrinks_only_while_the_crop_still_covers_the_output():
    assert dct_scale(300, 400, 224, 224) == 1
    assert dct_scale(448, 448, 224, 224) == 2 and dct_scale(448, 447, 224, 224) == 1
    assert dct_scale(1944, 2592, 224, 224) == 8 and dct_scale(1944, 2592, 160, 160) == 8
    assert dct_scale(1000, 1000, 224, 224) == 4 and dct_scale(1000, 1000, 64, 64) == 8


def test_damaged_input_and_a_small_buffer_are_refused(jpegs):
    jpeg = jpegs[0]
    h, w = size(jpeg)
    bounds = np.zeros(6)
    out = np.zeros(h * w * 3, dtype=np.uint8)
    text = np.frombuffer(b"this is not a JPEG, only text named .jpg" * 10, dtype=np.uint8)
    assert decode_region(text, out, 0, 0, 10, 10, 1, bounds) == -1
    assert decode_region(jpeg[:2], out, 0, 0, 10, 10, 1, bounds) == -1  # the start-of-image marker alone
    small = np.full(100 * w * 3, 7, dtype=np.uint8)
    assert decode_region(jpeg, small[:-1], 0, 0, 100, w, 1, bounds) == -1  # one byte short: nothing written
    assert (small == 7).all()
    assert decode_region(jpeg, small, 0, 0, 100, w, 1, bounds) == 0 and bounds[:2].tolist() == [100, w]
    assert decode_region(jpeg, out, h, 0, 10, 10, 1, bounds) == -1  # a region outside the image
    # the same decompressor (one per thread) still decodes after the refusals
    assert decode_region(jpeg, out, 0, 0, h, w, 1, bounds) == 0


@pytest.mark.parametrize("out", [(224, 224), (160, 96), (37, 300)])
def test_the_area_resize_equals_opencvs_inter_area(jpegs, out):
    rng = np.random.default_rng(out[0])
    for jpeg in jpegs[:8]:
        h, w = size(jpeg)
        whole = np.asarray(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))
        top, left = int(rng.integers(0, h - out[0])), int(rng.integers(0, w - out[1]))
        bottom, right = int(rng.integers(top + out[0], h + 1)), int(rng.integers(left + out[1], w + 1))
        got = np.zeros((*out, 3), dtype=np.uint8)
        assert resize_area(whole, top, bottom, left, right, got) == 0
        want = cv2.resize(whole[top:bottom, left:right], out[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 0.05  # summing order


def resize_area_at(image: np.ndarray, *bounds: float) -> np.ndarray:
    """`image` between `bounds` (rows, then columns) shrunk to 64x80 by resize_area."""
    out = np.zeros((64, 80, 3), dtype=np.uint8)
    assert resize_area(image, *bounds, out) == 0
    return out


def test_the_area_resize_takes_fractional_bounds(jpegs):
    """Half-pixel bounds on a photo equal whole-pixel bounds on the photo with every pixel doubled each way."""
    whole = np.asarray(Image.open(io.BytesIO(jpegs[1].tobytes())).convert("RGB"))
    doubled = whole.repeat(2, axis=0).repeat(2, axis=1)
    got = resize_area_at(whole, 10.5, 150.0, 20.5, 200.5)
    want = resize_area_at(doubled, 21, 300, 41, 401)
    assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 0.05
    assert (got != resize_area_at(whole, 10, 150, 20, 200)).mean() > 0.2, "half a pixel shows"


def test_the_area_resize_refuses_to_enlarge():
    source = np.zeros((100, 120, 3), dtype=np.uint8)
    out = np.full((64, 64, 3), 7, dtype=np.uint8)
    assert resize_area(source, 0, 100, 0, 63, out) == -1 and (out == 7).all()  # 63 columns to 64: OpenCV's job
    assert resize_area(source, 0, 63.5, 0, 120, out) == -1 and (out == 7).all()
    assert resize_area(source, 50, 150, 0, 120, out) == -1 and (out == 7).all()  # past the last row
    assert resize_area(source, 0, 64, 0, 64, out) == 0 and (out == 0).all()


def ffcv_batches(path, decoder) -> np.ndarray:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=32, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [decoder], "label": [IntDecoder()]})
    return np.concatenate([np.array(images) for images, _ in loader])


def pil_crops(beton: BetonFile, side: int) -> np.ndarray:
    """Each stored photo's centre crop (FFCV's box) resized by PIL's antialiased bilinear, torchvision's resize."""
    out = []
    for k in range(len(beton)):
        image = beton.image(k)
        top, left, h, w = get_center_crop(*image.shape[:2], None, CENTER_CROP_RATIO)
        out.append(np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h)).resize((side, side),
                                                                                                Image.BILINEAR)))
    return np.array(out, dtype=int)


@pytest.mark.parametrize("side", [224, 160, 64])
def test_centre_crops_equal_ffcvs_own_decoder(hymenoptera_data, side):
    """At 224 the ~328 px crops decode at full scale: FFCV's pixels, bar the area average's rounding. At 160 and
    64 they shrink by 2 and 4 in the DCT first, and differ from FFCV's a little; no further from torchvision's
    PIL resize of the same crops than FFCV's own are."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    path = hymenoptera_data / "test.beton"
    ours = ffcv_batches(path, CenterCropDecoder((side, side), ratio=CENTER_CROP_RATIO)).astype(int)
    theirs = ffcv_batches(path, CenterCropRGBImageDecoder((side, side), ratio=CENTER_CROP_RATIO)).astype(int)
    assert ours.shape == theirs.shape == (153, side, side, 3)
    if side == 224:
        assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
        return
    pil = pil_crops(BetonFile(path), side)
    assert 0.2 < np.abs(ours - theirs).mean() < 4
    assert np.abs(ours - pil).mean() < np.abs(theirs - pil).mean() + 0.25


# ---- hostile records (issue 26): crafted JPEGs and arguments, each refused with -1 ----

def crafted_jpeg(shape: tuple[int, int] = (64, 48), **save) -> bytes:
    """A small noisy RGB JPEG written by PIL (its own Huffman and quantization tables)."""
    pixels = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85, **save)
    return out.getvalue()


def without_marker(data: bytes, marker: int) -> bytes:
    """`data` with every segment of `marker` (0xC4 DHT, 0xDB DQT) before the first scan cut out."""
    out, i = bytearray(data[:2]), 2
    while data[i + 1] != 0xDA:
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] != marker:
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


def decode(data: bytes, top: int = 0, left: int = 0, height: int = 16, width: int = 16,
           denom: int = 1) -> tuple[int, np.ndarray]:
    """decode_region's status and output for a 16x16-or-so crop, checking it wrote nothing past its rows."""
    out = np.full(64 * 64 * 3 + 64, 7, dtype=np.uint8)
    bounds = np.zeros(6)
    status = decode_region(np.frombuffer(data, dtype=np.uint8), out, top, left, height, width, denom, bounds)
    used = int(bounds[0] * bounds[1] * 3) if status == 0 else 0
    assert (out[used:] == 7).all(), "wrote past its rows"
    return status, out[:used]


def test_a_jpeg_without_its_own_tables_is_refused_even_after_another_image():
    """libjpeg keeps tables from the image before (and libjpeg-turbo falls back to standard Huffman tables): a
    record missing its DHT or DQT decoded, with pixels that depended on what the thread decoded before."""
    good = crafted_jpeg()
    assert decode(good)[0] == 0
    for marker in (0xC4, 0xDB):
        damaged = without_marker(good, marker)
        assert len(damaged) < len(good)
        assert decode(damaged)[0] == -1  # alone
        assert decode(good)[0] == 0 and decode(damaged)[0] == -1  # right after a good image
    progressive = crafted_jpeg(progressive=True)
    assert decode(progressive)[0] == 0 and decode(without_marker(progressive, 0xC4))[0] == -1


def test_the_same_record_decodes_the_same_whatever_came_before():
    damaged = bytearray(crafted_jpeg())
    damaged[len(damaged) // 2] ^= 0x5A  # a flipped byte in the entropy-coded data
    alone = decode(bytes(damaged))
    for before in (crafted_jpeg((48, 64), progressive=True), crafted_jpeg(subsampling=0)):
        decode(before)
        after = decode(bytes(damaged))
        assert after[0] == alone[0] and np.array_equal(after[1], alone[1])


def with_size(data: bytes, height: int, width: int) -> bytes:
    """`data` with its frame header (SOF0/SOF2) claiming height x width pixels."""
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    return data[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9:]


def test_a_header_over_the_pixel_limit_is_refused_before_allocating():
    """A ~500-byte progressive JPEG claiming 16384x65500 pixels made libjpeg allocate its whole coefficient
    buffer (3.1 GB, 1.7 s) to return a 512x512 crop; the converter's pixel limit refuses it from the header."""
    import resource
    import time

    small = np.zeros((16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).save(out, format="JPEG", progressive=True)
    bomb = with_size(out.getvalue(), 16384, 65500)
    assert len(bomb) < 1000
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    assert decode(bomb, 0, 0, 32, 32)[0] == -1
    assert time.perf_counter() - start < 0.1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    strip = io.BytesIO()  # 89,472,681 pixels: under the limit, decoded (its first rows are all a crop there needs)
    Image.fromarray(np.zeros((32, 9459, 3), dtype=np.uint8)).save(strip, format="JPEG")
    assert decode(with_size(strip.getvalue(), 9459, 9459), 0, 0, 16, 16)[0] == 0
    truncated = with_size(out.getvalue(), 9459, 9459)  # decoded too, but its data ends: libjpeg's warning refuses it
    assert decode_region(np.frombuffer(truncated, dtype=np.uint8), np.zeros(64 * 64 * 3, dtype=np.uint8), 0, 0, 16,
                         16, 1, np.zeros(6)) == -1


def test_a_progressive_jpeg_stops_at_the_scan_limit():
    """Each scan of a progressive JPEG is read over every block before any row comes out: without a limit, 1,000
    extra copies of the last scan of a 2048x2048 image took 43 times as long as 20 (2.6 s against 0.06 s here;
    a few hundred KB of empty scans over a larger frame would take minutes). Past MAX_SCANS (100) the decode
    stops, so 1,000 extra scans cost about what 90 do. Both are refused (a repeated scan is a libjpeg warning)."""
    import time

    out = io.BytesIO()
    Image.fromarray(np.full((2048, 2048, 3), 128, dtype=np.uint8)).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    last = data[data.rfind(b"\xff\xda"):-2]  # the last scan, up to EOI

    def seconds(extra: int) -> float:
        jpeg = np.frombuffer(data[:-2] + last * extra + data[-2:], dtype=np.uint8)
        start = time.perf_counter()
        assert decode_region(jpeg, np.zeros(64 * 64 * 3, dtype=np.uint8), 0, 0, 64, 64, 1, np.zeros(6)) == -1
        return time.perf_counter() - start

    few, many = min(seconds(20) for _ in range(3)), min(seconds(1000) for _ in range(3))
    assert many < 12 * few, (few, many)


def test_data_libjpeg_only_warns_about_is_refused():
    """libjpeg decodes a JPEG whose entropy data is damaged with a warning ("premature end of data segment", here
    from its first block on) and made-up pixels, which the crop decoder returned: FFCV trained on them with no
    message (issue 40). A warning fails the decode now, as an error does."""
    good = crafted_jpeg()
    sos = good.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
    damaged = good[:start] + b"\xff" * (len(good) - start - 2) + good[-2:]  # the scan overwritten, markers intact
    assert decode(good, 0, 0, 16, 16)[0] == 0
    assert decode_region(np.frombuffer(damaged, dtype=np.uint8), np.zeros(64 * 64 * 3, dtype=np.uint8), 0, 0, 16, 16,
                         1, np.zeros(6)) == -1
    assert imdecode(np.frombuffer(damaged, dtype=np.uint8), np.zeros(64 * 48 * 3, dtype=np.uint8), 64, 48, 64, 48,
                    0, 0, 1, 1, False, False) == -1  # FFCV's whole-image decode says so too: the decoders ask now


def test_every_argument_is_checked():
    good = crafted_jpeg()  # 64 x 48
    assert decode(good, 0, 0, 64, 48)[0] == 0
    bad = [(1, 0, 0, 16, 1), (0, 1, 16, 0, 1),  # empty regions
           (0, 0, 16, 16, 3), (0, 0, 16, 16, 0), (0, 0, 16, 16, 16),  # scales other than 1, 2, 4, 8
           (2**32 - 16, 0, 32, 16, 1), (0, 2**32 - 8, 16, 16, 1),  # top + height, left + width wrap in 32 bits
           (1, 0, 64, 48, 1), (0, 1, 64, 48, 1), (-1, 0, 16, 16, 1)]  # past the image
    for top, left, height, width, denom in bad:
        assert decode(good, top, left, height, width, denom)[0] == -1, (top, left, height, width, denom)


@pytest.mark.parametrize("bounds", [(float("nan"), 50, 0, 60), (0, float("nan"), 0, 60), (0, 50, float("nan"), 60),
                                    (0, 50, 0, float("nan")), (0, float("inf"), 0, 60), (-0.5, 50, 0, 60),
                                    (float("-inf"), 50, 0, 60), (30, 10, 0, 60)])
def test_the_area_resize_refuses_nan_infinite_and_reversed_bounds(bounds):
    source = np.zeros((100, 120, 3), dtype=np.uint8)
    out = np.full((8, 8, 3), 7, dtype=np.uint8)
    assert resize_area(source, *bounds, out) == -1 and (out == 7).all()
    assert resize_area(source, 0, 50, 0, 60, out) == 0


def test_the_area_resize_refuses_empty_arrays():
    out = np.full((8, 8, 3), 7, dtype=np.uint8)
    assert resize_area(np.zeros((0, 120, 3), dtype=np.uint8), 0, 0, 0, 60, out) == -1
    assert resize_area(np.zeros((100, 120, 3), dtype=np.uint8), 0, 50, 0, 60, out[:0]) == -1
    assert (out == 7).all()
