"""Photo records cut to crops for the photo backend: the crop boxes ffcv-imagenet draws (random-resized for
training, centre for evaluation), and the ways of cutting them out of the stored records. Every way resizes as
the ffcv photo path does, or as near as Pillow can: an area average (OpenCV's INTER_AREA) when the crop shrinks both
ways, else bilinear.

- On the host, on a pool of threads (the compiled decoder and Pillow release the GIL):
  - `crop_library.crop_batch`, where the install built `crop_decode.c` (`crop_library.available()`), a chunk of a
    batch per call: the ffcv path's own C, decoding only the crop's rows and block columns of a JPEG, shrunk by
    1/2-1/8 in the DCT when the crop is at least twice that many times the output, then area-averaged (bilinear
    where a crop is enlarged), with no Python per record.
  - `pillow_crop`, the core install's, one record per call: Pillow decodes the whole JPEG, shrunk in the DCT alike
    (`Image.draft`), so a 500-px photo cropped to 160 px is not decoded at full size, then resizes with its
    bilinear filter, which widens with the shrink: of Pillow's filters the closest to the area average on the
    hymenoptera photos (a mean 0.8 levels away at 224 px centre crops; its box filter, which takes a pixel wholly
    or not at all, 2.7).
- On the device, a whole batch per call (`DeviceCrops`): torchvision decodes the batch's JPEGs in one call (nvJPEG
  on CUDA), raw records are copied up as they are, and each chunk of images is zero-padded to one size and
  resized by two batched matrix products with per-image filter weights (`filter_weights`), which reach no pixel
  outside each image's own crop window. The crops all differ in size, so neither a batched resize of the images
  nor grouping them by size fits; torchvision's `roi_align` over the padded batch would, with a filter of its own
  (benchmarks/RESULTS.md measures the choice).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from beton_trainer.pipelines.base import CENTER_CROP_RATIO, RRC_RATIO, RRC_SCALE
from beton_trainer.pipelines.crop_library import dct_scale

__all__ = ["DEVICE_CHUNK", "MAX_SCANS", "DeviceCrops", "centre_boxes", "check_scans", "filter_weights",
           "pillow_crop", "random_boxes", "whole_boxes"]

ATTEMPTS = 10  # random-resized-crop draws before the fallback, as torchvision and FFCV
MAX_SCANS = 100  # crop_decode.c's limit on a progressive JPEG's scans, which Pillow and torchvision do not have
DEVICE_CHUNK = 64  # images resized together on the device: bounds the padded float batch and the filter weights


def random_boxes(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop boxes, (top, left, height, width) int64, for images of (height, width) `sizes`, drawn as
    FFCV's `get_random_crop` (and torchvision) draws them: up to ten tries of an area fraction uniform in RRC_SCALE
    and an aspect ratio log-uniform in RRC_RATIO, the first that fits, at a uniform position; where none fits, the
    whole image clipped to the ratio range, centred. A fixed number of draws per image, whatever is kept."""
    n = len(sizes)
    h, w = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    area = (h * w)[:, None] * rng.uniform(*RRC_SCALE, size=(n, ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), size=(n, ATTEMPTS)))
    tries_w, tries_h = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    fits = (tries_w >= 1) & (tries_w <= w[:, None]) & (tries_h >= 1) & (tries_h <= h[:, None])
    first = fits.argmax(axis=1)
    found = fits[np.arange(n), first]
    ratio = w / h
    whole_w = np.where(ratio > RRC_RATIO[1], np.rint(h * RRC_RATIO[1]), w)
    whole_h = np.where(ratio < RRC_RATIO[0], np.rint(w / RRC_RATIO[0]), h)
    crop_h = np.where(found, tries_h[np.arange(n), first], whole_h)
    crop_w = np.where(found, tries_w[np.arange(n), first], whole_w)
    position = rng.random((n, 2))
    top = np.where(found, np.floor(position[:, 0] * (h - crop_h + 1)), (h - crop_h) // 2)
    left = np.where(found, np.floor(position[:, 1] * (w - crop_w + 1)), (w - crop_w) // 2)
    return np.stack([top, left, crop_h, crop_w], axis=1).astype(np.int64)


def centre_boxes(sizes: np.ndarray) -> np.ndarray:
    """FFCV's `get_center_crop` boxes: the centred square of CENTER_CROP_RATIO (224/256) times the shorter side, which
    resized to the output is the resize of the shorter side to output / 0.875 and the centre crop."""
    sizes = np.asarray(sizes, dtype=np.int64)
    side = np.maximum((CENTER_CROP_RATIO * sizes.min(axis=1)).astype(np.int64), 1)
    return np.stack([(sizes[:, 0] - side) // 2, (sizes[:, 1] - side) // 2, side, side], axis=1)


def whole_boxes(sizes: np.ndarray) -> np.ndarray:
    """Each image whole: fixed-size data keeps its stored pixels."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.concatenate([np.zeros_like(sizes), sizes], axis=1)


def check_scans(record: np.ndarray) -> None:
    """Raises ValueError for a JPEG of more than MAX_SCANS scans: a decoder reads each over every block before
    any row comes out, so a few hundred KB of empty scans would hold it for minutes (crop_decode.c refuses them
    alike). Entropy-coded data never holds 0xFF 0xDA (0xFF is followed by 0x00 or a marker there): each is a scan
    marker, or a byte pair in a header segment, which counts against the record."""
    scans = record.tobytes().count(b"\xff\xda")
    if scans > MAX_SCANS:
        raise ValueError(f"a progressive JPEG of {scans} scans; at most {MAX_SCANS} are decoded")


def pillow_crop(record: np.ndarray, jpeg: bool, size: tuple[int, int], box: np.ndarray,
                out: tuple[int, int]) -> np.ndarray:
    """Record `record` (JPEG bytes, or raw (height, width, 3) pixels when not `jpeg`) of (height, width) `size`: its
    crop `box` (top, left, height, width) resized to `out` (height, width), uint8 RGB, by Pillow. Raises what Pillow
    raises for a damaged JPEG, and ValueError for a JPEG of another size than `size` or of too many scans."""
    h, w = size
    top, left, crop_h, crop_w = (int(v) for v in box)
    scale = 1
    if jpeg:
        check_scans(record)
        image = Image.open(io.BytesIO(record), formats=["JPEG"])
        if image.size != (w, h):
            raise ValueError(f"a {image.size[1]}x{image.size[0]} JPEG where the file says {h}x{w}")
        denom = dct_scale(crop_h, crop_w, *out)
        if denom > 1 and (drafted := image.draft("RGB", (w // denom, h // denom))) is not None:
            scale = w / drafted[1][2]  # the DCT's shrink: pixel k covers source pixels [k * scale, (k + 1) * scale)
    else:
        image = Image.frombuffer("RGB", (w, h), record, "raw", "RGB", 0, 1)
    bounds = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
    crop = image.resize((out[1], out[0]), Image.BILINEAR, box=bounds)
    return np.asarray(crop if crop.mode == "RGB" else crop.convert("RGB"))


class DeviceCrops:
    """A batch of records to uint8 (n, 3, out_h, out_w) crops on `device`: one torchvision decode of all its JPEGs
    (nvJPEG on CUDA; libjpeg-turbo on the CPU, where the tests run it), the raw records copied up as they are, then
    per chunk of DEVICE_CHUNK images a zero-padded batch resized by two batched products with `filter_weights`.
    Nothing waits for the device: sizes and boxes come from the host's metadata."""

    def __init__(self, device: torch.device):
        self.device = device
        # torch's only batched pad of tensors of several sizes; its prototype warning says nothing to a user
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

    def __call__(self, staged: torch.Tensor, offsets: np.ndarray, jpeg: np.ndarray, sizes: np.ndarray,
                 geometry: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
        """`staged`: the batch's records back to back on the host (pinned on CUDA), record k at offsets[k] up to
        offsets[k + 1]; `jpeg`, `sizes`: each record's kind and (height, width); `geometry`: (n, 6) float64 on the
        device, each record's height, width and crop box (top, left, height, width)."""
        images = self.decode(staged, offsets, jpeg, sizes)
        crops = torch.empty((len(images), 3, *out), dtype=torch.uint8, device=self.device)
        for start in range(0, len(images), DEVICE_CHUNK):
            part = slice(start, start + DEVICE_CHUNK)
            padded = torch.nested.as_nested_tensor(images[part]).to_padded_tensor(0).float()
            g = geometry[part]
            area = (g[:, 4] >= out[0]) & (g[:, 5] >= out[1])  # as the host decoders choose
            across = filter_weights(g[:, 1], g[:, 3], g[:, 5], out[1], padded.shape[3], area)  # (k, out_w, width)
            down = filter_weights(g[:, 0], g[:, 2], g[:, 4], out[0], padded.shape[2], area)  # (k, out_h, height)
            resized = down[:, None] @ (padded @ across.transpose(1, 2)[:, None])
            crops[part] = resized.round_().clamp_(0, 255)
        return crops

    def decode(self, staged: torch.Tensor, offsets: np.ndarray, jpeg: np.ndarray,
               sizes: np.ndarray) -> list[torch.Tensor]:
        """Each record as (3, height, width) uint8 on the device, in order."""
        records = [staged[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        images: list[torch.Tensor | None] = [None] * len(records)
        where = np.flatnonzero(jpeg).tolist()
        if where:
            for k in where:
                check_scans(records[k].numpy())
            decoded = decode_jpeg([records[k] for k in where], mode=ImageReadMode.RGB, device=self.device)
            for k, image in zip(where, decoded):
                images[k] = image
        if not jpeg.all():
            on_device = staged[:int(offsets[-1])].to(self.device, non_blocking=True)
            for k in np.flatnonzero(~jpeg).tolist():
                h, w = (int(v) for v in sizes[k])
                images[k] = on_device[int(offsets[k]):int(offsets[k + 1])].view(h, w, 3).permute(2, 0, 1)
        return images


def filter_weights(length: torch.Tensor, start: torch.Tensor, extent: torch.Tensor, out: int, padded: int,
                   area: torch.Tensor) -> torch.Tensor:
    """(k, out, padded) float32: for each of k images, output pixel i's weights over source pixels [0, padded) along
    one axis, for the crop [start, start + extent) of an axis of `length` pixels. Where `area`: the share of each
    source pixel in the output pixel's span [start + i * s, start + (i + 1) * s), s = extent / out (OpenCV's
    INTER_AREA, the compiled decoder's `resize_area`). Elsewhere Pillow's bilinear resize (Resample.c,
    precompute_coeffs, in its order of operations and with its window): a triangle widened by the shrink factor,
    centred on the output pixel, cut to the image and normalized. In float64, as both."""
    scale = (extent / out)[:, None, None]
    position = torch.arange(out, device=start.device, dtype=start.dtype)[None, :, None]
    source = torch.arange(padded, device=start.device, dtype=start.dtype)[None, None, :]
    begin = start[:, None, None] + position * scale
    share = (torch.minimum(source + 1, begin + scale) - torch.maximum(source, begin)).clamp_min(0) / scale
    support = scale.clamp_min(1.0)
    centre = start[:, None, None] + (position + 0.5) * scale
    triangle = (1 - ((source - centre + 0.5) * (1 / support)).abs()).clamp_min(0)
    first = (centre - support + 0.5).trunc().clamp_min(0)  # Pillow's window, which can leave out a pixel at a tie
    end = torch.minimum((centre + support + 0.5).trunc(), length[:, None, None])
    triangle = triangle * ((source >= first) & (source < end))
    triangle = triangle / triangle.sum(dim=2, keepdim=True)
    return torch.where(area[:, None, None], share, triangle).float()
