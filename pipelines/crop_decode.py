"""FFCV crop decoders that decode only the crop: ffcv-imagenet's random-resized-crop (training) and centre-crop
(evaluation) decoders, with FFCV 1.0.2's whole-image decode and OpenCV resize replaced by `crop_decode.c`.

FFCV 1.0.2 decodes each JPEG whole into a scratch buffer, then resizes the crop out of it with OpenCV's area
interpolation. A random-resized crop covers about half the image on average (area 8-100%), so half the decoding
was thrown away, and the resize took as long as the decoding. Here libjpeg-turbo decodes only the crop's rows
and block columns, shrinking by 1/2, 1/4 or 1/8 in the DCT when the crop is at least that many times the output
side (large photos); then the same area average as OpenCV's shrinks it, 1.8-2.5x faster. A crop smaller than
the output (upscaling) is resized by FFCV's OpenCV call, as before. Raw (uncompressed) images in FFCV's mixed
mode are only resized. A crop decoded at full scale gives the same pixels as FFCV's whole-image decode, and
the area average matches OpenCV's to within one level; a shrunk crop's bounds stay exact (fractional) through
the resize.

The crops are drawn by FFCV's own `get_random_crop`/`get_center_crop` with the same arguments.

A record libjpeg cannot decode, or decodes only with a warning (corrupt entropy data: it goes on with made-up
pixels), stops the epoch: FFCV's decoders ignore the decoder's status, so a damaged record trained silently.
These decoders, and `FixedSizeDecoder` for images of one size, raise `UndecodableRecord` naming it in FFCV's
worker thread (after the batch's parallel loop, which a raise inside would serialize); the FFCV backend turns
it into one line.

The library is loaded by `pipelines.crop_library` and is optional: `pip install .[ffcv]` builds it where a C
compiler and libjpeg headers are present, and a failed build never fails the install. Without it,
`photo_decoders` falls back to FFCV's own decoders, with one warning line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.libffcv import imdecode, memcpy, resize_crop
from ffcv.pipeline.compiler import Compiler

from beton_trainer.pipelines.crop_library import LIBRARY, available, dct_scale, decode_region, resize_area

__all__ = ["CenterCropDecoder", "FixedSizeDecoder", "UndecodableRecord", "photo_decoders"]

NOT_BUILT = (f"warning: {LIBRARY} (the FFCV photo path's crop decoder) is not built, so FFCV's own decoders "
             "decode whole images (about 2x slower); install a C compiler and libjpeg headers (e.g. apt-get install "
             "gcc libjpeg-dev) and reinstall with `pip install .[ffcv]` to build it")
_warned = False


class UndecodableRecord(Exception):
    """A JPEG record that libjpeg could not decode, or decoded with a warning; args: (the record's index,).
    Raised from FFCV's compiled decoders in its worker thread."""


class _RegionDecoding:
    """generate_code for FFCV's ResizedCropRGBImageDecoder subclasses, decoding only the crop."""

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        decode_region_c = Compiler.compile(decode_region)
        resize_area_c = Compiler.compile(resize_area)
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        dct_scale_c = Compiler.compile(dct_scale)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            out_height, out_width = destination.shape[1], destination.shape[2]
            failed = np.zeros(len(batch_indices), dtype=np.int64)  # see FixedSizeDecoder for why int64
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                temp = temp_storage[dst_ix]
                region = np.empty(6, dtype=np.float64)  # rows, cols, then the crop's bounds in them
                if field["mode"] == jpg and decode_region_c(image_data, temp, i, j, h, w,
                                                            dct_scale_c(h, w, out_height, out_width), region) == 0:
                    crop = temp[:int(region[0]) * int(region[1]) * 3].reshape(int(region[0]), int(region[1]), 3)
                else:
                    if field["mode"] == jpg:  # libjpeg refused the region: decode whole as FFCV does
                        if imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False):
                            failed[dst_ix] = 1  # -1 from TurboJPEG: an error, or corrupt data
                        crop = temp[:height * width * 3].reshape(height, width, 3)
                    else:  # raw pixels
                        crop = image_data.reshape(height, width, 3)
                    region[2], region[3], region[4], region[5] = i, i + h, j, j + w
                if resize_area_c(crop, region[2], region[3], region[4], region[5], destination[dst_ix]) != 0:
                    # an enlargement (never after a DCT shrink, so the bounds are whole): OpenCV's, as FFCV
                    resize_crop_c(crop, int(region[2]), int(region[3]), int(region[4]), int(region[5]),
                                  destination[dst_ix])
            for dst_ix in range(len(batch_indices)):
                if failed[dst_ix]:
                    raise UndecodableRecord(batch_indices[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class RandomResizedCropDecoder(_RegionDecoding, RandomResizedCropRGBImageDecoder):
    """ffcv-imagenet's training decoder (random crop of area `scale`, aspect `ratio`, resized to
    `output_size`), decoding only the crop."""


class CenterCropDecoder(_RegionDecoding, CenterCropRGBImageDecoder):
    """ffcv-imagenet's evaluation decoder (centre square of `ratio` times the shorter side, resized to
    `output_size`), decoding only the crop."""


class FixedSizeDecoder(SimpleRGBImageDecoder):
    """FFCV's decoder for images of one size (stored as they are, or as JPEG), refusing a JPEG record it cannot
    decode instead of passing on whatever the buffer held."""

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        memcpy_c = Compiler.compile(memcpy)

        def decode(batch_indices, destination, metadata, storage_state):
            # int64: FFCV's memory managers set `mutable = False` on numba's shared uint8, uint32 and uint64
            # array types (meaning their own state), which would make a flag array of those types read-only
            failed = np.zeros(len(batch_indices), dtype=np.int64)
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = field["height"], field["width"]
                if field["mode"] != jpg:
                    memcpy_c(image_data, destination[dst_ix])
                elif imdecode_c(image_data, destination[dst_ix], height, width, height, width, 0, 0, 1, 1, False,
                                False):
                    failed[dst_ix] = 1
            for dst_ix in range(len(batch_indices)):
                if failed[dst_ix]:
                    raise UndecodableRecord(batch_indices[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def photo_decoders() -> tuple[type, type]:
    """The training and evaluation crop decoders for photos: this module's, or, where the library is not built,
    FFCV's own (the same crops, decoding whole images), after one warning line per process."""
    global _warned
    if available():
        return RandomResizedCropDecoder, CenterCropDecoder
    if not _warned:
        print(NOT_BUILT, file=sys.stderr)
        _warned = True
    return RandomResizedCropRGBImageDecoder, CenterCropRGBImageDecoder
