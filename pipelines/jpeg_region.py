"""FFCV crop decoders that decode only the crop: ffcv-imagenet's random-resized-crop (training) and centre-crop
(evaluation) decoders, with FFCV 1.0.2's whole-image JPEG decode replaced by `jpeg_region.c`.

FFCV 1.0.2 decodes each JPEG whole into a scratch buffer, then resizes the crop out of it. On photos, a
random-resized crop covers about half the image on average (area 8-100%), so half the decoding is thrown
away. Here libjpeg-turbo decodes only the crop's rows and block columns, and shrinks by 1/2, 1/4 or 1/8 in
the DCT when the crop is at least that many times the output side (large photos). The resize that follows
is FFCV's own (OpenCV, area interpolation), so a crop decoded whole or by region differs only in the DCT
scaling. Raw (uncompressed) images in FFCV's mixed mode are cropped as FFCV does.

The crops are drawn by FFCV's own `get_random_crop`/`get_center_crop` with the same arguments.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable

import numpy as np
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

from common.errors import UserError

LIBRARY = "pipelines._jpeg_region"  # built from jpeg_region.c by `pip install -e .` (setup.py)


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        raise UserError(f"{LIBRARY} (the FFCV backend's region JPEG decoder) is not built; run `make setup` "
                        "(needs libjpeg-dev and a C compiler)")
    lib = ctypes.CDLL(spec.origin)
    lib.decode_region.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                                  *[ctypes.c_uint32] * 5, ctypes.c_void_p]
    lib.decode_region.restype = ctypes.c_int
    return lib


_decode_region_c = _load().decode_region


def decode_region(source: np.ndarray, dst: np.ndarray, top: int, left: int, height: int, width: int,
                  scale_denom: int, shape: np.ndarray) -> int:
    """Decodes rows [top, top + height) and columns [left, left + width) of the JPEG `source`, shrunk by
    `scale_denom` (1, 2, 4 or 8), into `dst` as (shape[0], shape[1], 3) RGB; the crop is all its rows and columns
    [shape[2], shape[3]). Returns 0, or -1 if libjpeg could not."""
    return _decode_region_c(source.ctypes.data, source.size, dst.ctypes.data, dst.size, top, left, height, width,
                            scale_denom, shape.ctypes.data)


def dct_scale(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest of 1, 2, 4, 8 that the crop can be shrunk by in the DCT and still cover the output."""
    denom = 1
    while denom < 8 and crop_height >= 2 * denom * out_height and crop_width >= 2 * denom * out_width:
        denom *= 2
    return denom


class _RegionDecoding:
    """generate_code for FFCV's ResizedCropRGBImageDecoder subclasses, decoding only the crop."""

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        decode_region_c = Compiler.compile(decode_region)
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        dct_scale_c = Compiler.compile(dct_scale)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            out_height, out_width = destination.shape[1], destination.shape[2]
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                if field["mode"] != jpg:
                    resize_crop_c(image_data.reshape(height, width, 3), i, i + h, j, j + w, destination[dst_ix])
                    continue
                temp = temp_storage[dst_ix]
                shape = np.empty(4, dtype=np.int32)
                denom = dct_scale_c(h, w, out_height, out_width)
                if decode_region_c(image_data, temp, i, j, h, w, denom, shape) == 0:
                    rows, cols = shape[0], shape[1]
                    region = temp[:rows * cols * 3].reshape(rows, cols, 3)
                    resize_crop_c(region, 0, rows, shape[2], shape[3], destination[dst_ix])
                else:  # libjpeg refused the region: decode whole as FFCV does (same result for a damaged file)
                    imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
                    whole = temp[:height * width * 3].reshape(height, width, 3)
                    resize_crop_c(whole, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class RandomResizedCropDecoder(_RegionDecoding, RandomResizedCropRGBImageDecoder):
    """ffcv-imagenet's training decoder (random crop of area `scale`, aspect `ratio`, resized to
    `output_size`), decoding only the crop."""


class CenterCropDecoder(_RegionDecoding, CenterCropRGBImageDecoder):
    """ffcv-imagenet's evaluation decoder (centre square of `ratio` times the shorter side, resized to
    `output_size`), decoding only the crop."""
