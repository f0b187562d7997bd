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

from pipelines.base import CENTER_CROP_RATIO  # noqa: E402
from pipelines.crop_decode import CenterCropDecoder, dct_scale, decode_region, resize_area  # noqa: E402
from pipelines.dataset import BetonFile  # noqa: E402


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
