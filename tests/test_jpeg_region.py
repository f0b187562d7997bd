"""The region JPEG decoder behind the FFCV backend's crop decoders (pipelines/jpeg_region.c) on the real
hymenoptera photos (up to 2592x1944, as the tarball holds them): a region decoded alone equals the same pixels of
FFCV's whole-image decode; shrunk by 2, 4 or 8 it equals libjpeg's shrunk whole-image decode there; damaged
input and a too-small buffer are refused, never written past. The loaders' crop positions, statistics and
centre crops against PIL are in tests/test_photo_loaders.py."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.loader_helpers import require

require("ffcv")

from ffcv.libffcv import imdecode  # noqa: E402

from pipelines.jpeg_region import dct_scale, decode_region  # noqa: E402


@pytest.fixture(scope="module")
def jpegs(real_data_root) -> list[np.ndarray]:
    """Twelve real photos' JPEG bytes, both classes, several sizes."""
    with tarfile.open(real_data_root / "hymenoptera_data.tar") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.lower().endswith(".jpg") and "/train/" in m.name)
        return [np.frombuffer(tar.extractfile(name).read(), dtype=np.uint8) for name in names[::20][:12]]


def size(jpeg: np.ndarray) -> tuple[int, int]:
    """(height, width) from the JPEG header."""
    w, h = Image.open(io.BytesIO(jpeg.tobytes())).size
    return h, w


def region(jpeg: np.ndarray, top: int, left: int, height: int, width: int, denom: int = 1) -> np.ndarray:
    """decode_region's crop, cut out of its output buffer (every row, the columns it names)."""
    h, w = size(jpeg)
    out = np.full(h * w * 3 + 1, 7, dtype=np.uint8)
    shape = np.zeros(4, dtype=np.int32)
    assert decode_region(jpeg, out, top, left, height, width, denom, shape) == 0
    rows, cols, start, stop = (int(v) for v in shape)
    assert out[rows * cols * 3:].tolist() == [7] * (len(out) - rows * cols * 3), "wrote past its rows"
    return out[:rows * cols * 3].reshape(rows, cols, 3)[:, start:stop]


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
    """Edges round to the nearest pixel of the shrunk image."""
    rng = np.random.default_rng(denom)
    for jpeg in jpegs[:6]:
        h, w = size(jpeg)
        whole = region(jpeg, 0, 0, h, w, denom)
        assert whole.shape == ((h + denom // 2) // denom, (w + denom // 2) // denom, 3)
        for _ in range(4):
            rh, rw = int(rng.integers(8 * denom, h + 1)), int(rng.integers(8 * denom, w + 1))
            top, left = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
            y0, x0 = (top + denom // 2) // denom, (left + denom // 2) // denom
            y1, x1 = (top + rh + denom // 2) // denom, (left + rw + denom // 2) // denom
            np.testing.assert_array_equal(region(jpeg, top, left, rh, rw, denom), whole[y0:y1, x0:x1])


def test_dct_scale_shrinks_only_while_the_crop_still_covers_the_output():
    assert dct_scale(300, 400, 224, 224) == 1
    assert dct_scale(448, 448, 224, 224) == 2 and dct_scale(448, 447, 224, 224) == 1
    assert dct_scale(1944, 2592, 224, 224) == 8 and dct_scale(1944, 2592, 160, 160) == 8
    assert dct_scale(1000, 1000, 224, 224) == 4 and dct_scale(1000, 1000, 64, 64) == 8


def test_damaged_input_and_a_small_buffer_are_refused(jpegs):
    jpeg = jpegs[0]
    h, w = size(jpeg)
    shape = np.zeros(4, dtype=np.int32)
    out = np.zeros(h * w * 3, dtype=np.uint8)
    text = np.frombuffer(b"this is not a JPEG, only text named .jpg" * 10, dtype=np.uint8)
    assert decode_region(text, out, 0, 0, 10, 10, 1, shape) == -1
    assert decode_region(jpeg[:2], out, 0, 0, 10, 10, 1, shape) == -1  # the start-of-image marker alone
    small = np.full(100 * w * 3, 7, dtype=np.uint8)
    assert decode_region(jpeg, small[:-1], 0, 0, 100, w, 1, shape) == -1  # one byte short: nothing written
    assert (small == 7).all()
    assert decode_region(jpeg, small, 0, 0, 100, w, 1, shape) == 0 and shape[:2].tolist() == [100, w]
    assert decode_region(jpeg, out, h, 0, 10, 10, 1, shape) == -1  # a region outside the image
    # the same decompressor (one per thread) still decodes after the refusals
    assert decode_region(jpeg, out, 0, 0, h, w, 1, shape) == 0
