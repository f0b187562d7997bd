"""The compiled crop decoder (`crop_decode.c`), loaded with ctypes where the install built it: decode only a crop
of a JPEG, shrunk in the DCT when it is large, and resize by area averaging. The ffcv photo path calls it from
FFCV's compiled threads (`pipelines.crop_decode`), the photo backend from its decoding threads
(`pipelines.photo_loader`, a chunk of a batch a call: `crop_batch`); ctypes releases the GIL for each call.
Neither needs it: without it FFCV decodes with its own decoders and the photo backend with Pillow.
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np

__all__ = ["LIBRARY", "available", "crop_batch", "dct_scale", "decode_region", "resize_area"]

LIBRARY = f"{__package__}._crop_decode"  # built from crop_decode.c by setup.py, where a compiler and libjpeg are


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.decode_region.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                                  *[ctypes.c_uint32] * 5, ctypes.c_void_p]
    lib.resize_area.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, *[ctypes.c_double] * 4,
                                ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    lib.crop_batch.argtypes = [ctypes.c_void_p, ctypes.c_uint64, *[ctypes.c_void_p] * 5, ctypes.c_int32,
                               ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    lib.decode_region.restype = lib.resize_area.restype = lib.crop_batch.restype = ctypes.c_int
    return lib


_lib = _load()
_decode_region_c, _resize_area_c, _crop_batch_c = (_lib.decode_region, _lib.resize_area, _lib.crop_batch) if _lib \
    else (None, None, None)


def available() -> bool:
    """Whether the compiled crop decoder is there (`pip install .` builds it where a C compiler and libjpeg
    headers are)."""
    return _lib is not None


def decode_region(source: np.ndarray, dst: np.ndarray, top: int, left: int, height: int, width: int,
                  scale_denom: int, region: np.ndarray) -> int:
    """Decodes rows [top, top + height) and columns [left, left + width) of the JPEG `source`, shrunk by
    `scale_denom` (1, 2, 4 or 8), into `dst` as (region[0], region[1], 3) RGB pixels, a little more than asked;
    region[2:6] (float64) receive where the crop lies in them: first row, end row, first column, end column,
    fractional when shrunk. Returns 0, or -1 if libjpeg could not."""
    return _decode_region_c(source.ctypes.data, source.size, dst.ctypes.data, dst.size, top, left, height, width,
                            scale_denom, region.ctypes.data)


def resize_area(source: np.ndarray, y_begin: float, y_end: float, x_begin: float, x_end: float,
                dst: np.ndarray) -> int:
    """Rows [y_begin, y_end) x columns [x_begin, x_end) (fractional bounds allowed) of the (rows, cols, 3) uint8
    `source` (rows C-contiguous) shrunk into `dst` (h, w, 3) by area averaging, as OpenCV's INTER_AREA.
    Returns 0, or -1 without writing when that is not a shrink."""
    return _resize_area_c(source.ctypes.data, source.shape[0], source.shape[1], y_begin, y_end, x_begin, x_end,
                          dst.ctypes.data, dst.shape[0], dst.shape[1])


def crop_batch(mapped: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, jpeg: np.ndarray, sizes: np.ndarray,
               boxes: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Records of the uint8 buffer `mapped` (a `.beton` as mapped), record k its bytes [offsets[k], offsets[k] +
    lengths[k]), JPEG where jpeg[k] else raw (h, w, 3) pixels, of (h, w) sizes[k], each cut to its box (top, left,
    height, width) boxes[k] and resized into dst[k] ((n, out_h, out_w, 3) uint8, C-contiguous) in one call: the
    area average where the crop shrinks (a JPEG decoded only in the box, shrunk in the DCT by `dct_scale`), else
    bilinear. Returns the positions k of the records it refused (dst[k] then holds anything)."""
    n = len(offsets)
    if mapped.dtype != np.uint8 or mapped.ndim != 1 or not mapped.flags.c_contiguous:
        raise ValueError(f"crop_batch: mapped must be one C-contiguous run of uint8, got {mapped.dtype} "
                         f"{mapped.shape}")
    if dst.shape[0] != n or dst.dtype != np.uint8 or dst.ndim != 4 or dst.shape[3] != 3 or \
            not dst.flags.c_contiguous:
        raise ValueError(f"crop_batch: dst must be ({n}, height, width, 3) C-contiguous uint8, got {dst.shape} "
                         f"{dst.dtype}")
    offsets, lengths, sizes, boxes = (np.ascontiguousarray(a, dtype=np.int64) for a in (offsets, lengths, sizes, boxes))
    jpeg = np.ascontiguousarray(jpeg, dtype=np.uint8)
    if sizes.shape != (n, 2) or boxes.shape != (n, 4) or lengths.shape != (n,) or jpeg.shape != (n,):
        raise ValueError("crop_batch: one offset, length, kind, (height, width) and box per record")
    status = np.empty(n, dtype=np.int32)
    if _crop_batch_c(mapped.ctypes.data, mapped.size, offsets.ctypes.data, lengths.ctypes.data, jpeg.ctypes.data,
                     sizes.ctypes.data, boxes.ctypes.data, n, dst.ctypes.data, dst.shape[1], dst.shape[2],
                     status.ctypes.data) < 0:
        raise ValueError("crop_batch: the output has no pixels")
    return np.flatnonzero(status)


def dct_scale(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest of 1, 2, 4, 8 that the crop can be shrunk by in the DCT and still cover the output twice."""
    denom = 1
    while denom < 8 and crop_height >= 2 * denom * out_height and crop_width >= 2 * denom * out_width:
        denom *= 2
    return denom
