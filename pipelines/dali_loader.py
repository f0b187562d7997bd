"""The DALI backend: the augmentation spec as a DALI graph, fed from the reading layer's uint8 arrays.

Order and sharding are ours, as for the other backends: `fn.external_source` (batch mode,
`cycle="raise"`) yields this rank's samples in the order of `pipelines.base.rank_indices`, and the labels
never enter DALI (they are picked from the same order on the device). The graph runs on the GPU
(`.gpu()` right after the source) when the device is CUDA, and with `device_id=None` (CPU-only DALI)
otherwise. MixUp/CutMix has no DALI operator, so it runs after the iterator through the shared
`TrainTransform.mix`, keyed by `batch_generator` like every backend.

Randomness comes from DALI's own per-sample generators, seeded from (seed, epoch, rank) by rebuilding
the pipeline each epoch: the same seed gives the same batches, but not the tensor backend's batches.
DALI's generators cannot skip ahead, so `set_epoch(e, start_batch=k)` replays the first k batches and
drops them (a resume costs up to one epoch of augmentation work, once).

Where DALI's operators differ from the spec's torchvision semantics:
- contrast pivots around mid-grey (half the uint8 range) instead of each image's mean luminance
  (`fn.brightness_contrast` takes a fixed centre), and jitter rounds to uint8 after each of its two
  operators;
- saturation and hue use `fn.hsv`, which DALI approximates by a linear transform in RGB space (a
  rotation about the grey axis) rather than an exact HSV round trip; hue shifts are the spec's
  fractions of a turn times 360 degrees;
- the affine warp draws the spec's ranges and rotates like torchvision, but DALI's x-shear of +s degrees
  leans the way torchvision's -s does (the range is symmetric, so the distribution is the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from beton_trainer.format.dataset import Split, load_manifest, open_beton
from beton_trainer.format.integrity import check_integrity
from beton_trainer.pipelines.augment import AffineSpec, AugmentSpec, EraseSpec, JitterSpec, TrainTransform
from beton_trainer.pipelines.base import (
    CENTER_CROP_RATIO,
    RRC_RATIO,
    RRC_SCALE,
    ArrayLoader,
    LoaderOptions,
    ShardedLoader,
    varied_sizes,
)
from beton_trainer.pipelines.budget import PAGE_AWARE_FIX, USE_FFCV, allocations, check, dali_need

__all__ = ["DaliLoader"]

# torch's "reflect" does not repeat the edge pixel, which is DALI's "reflect_101"
OUT_OF_BOUNDS = {"constant": "pad", "reflect": "reflect_101"}


class DaliLoader(ArrayLoader):
    """Implements `pipelines.base.Loader` with a DALI pipeline per epoch. Opening a dataset of photos of
    varied sizes gives a `DaliPhotoLoader`, which decodes inside the pipeline."""

    def __new__(cls, options: LoaderOptions, split: Split | None = None):
        if cls is DaliLoader and split is None and varied_sizes(load_manifest(options.data_dir)):
            cls = DaliPhotoLoader
        return super().__new__(cls)

    def __init__(self, options: LoaderOptions, split: Split | None = None):
        if split is None:  # the .beton's header says what its arrays will take, before they are decoded (and
            # before open_split checks its pages)
            self.memory = dali_need(open_beton(options.data_dir, options.split, verify="off"), photos=False)
            check(self.memory, options.device, options.memory_budget_gb, USE_FFCV)
        with allocations("dali", USE_FFCV):  # the split decoded into host arrays
            super().__init__(options, split)
        self.images = self.split.images
        self._setup_dali(self.split.mean, self.split.std, self.split.num_classes)

    def _setup_dali(self, mean: Sequence[float], std: Sequence[float], num_classes: int) -> None:
        o = self.options
        self.spec = o.spec if o.train else AugmentSpec()
        # DALI does every stage but MixUp/CutMix; with eval's empty spec, mix() only sets the memory layout
        self.mix = TrainTransform(self.spec, mean=mean, std=std, num_classes=num_classes,
                                  label_smoothing=o.label_smoothing, channels_last=o.channels_last).mix
        device = o.device
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        o = self.options
        order, start = self._take_order()
        if start >= self._len:
            return
        batches = [order[b * o.batch_size:(b + 1) * o.batch_size] for b in range(self._len)]
        seed = int(np.random.SeedSequence([o.seed, self.epoch, o.rank]).generate_state(1)[0] & 0x7FFFFFFF)

        def source() -> Iterator[np.ndarray | list[np.ndarray]]:  # a generator function: DALI re-calls it to cycle
            for idx in batches:
                yield self._source_batch(idx)

        pipe = self.pipeline(source, seed)
        outputs = DALIGenericIterator(pipe, ["images"], last_batch_policy=LastBatchPolicy.PARTIAL)
        device_order = torch.from_numpy(order).to(o.device)  # one upload per epoch; batches slice it on the device
        for b, (out,) in enumerate(outputs):
            if b < start:
                continue  # replayed only to advance DALI's generators to batch `start`
            images = out["images"]  # on the device already: DALI's GPU graph writes there, the CPU graph is the CPU
            labels = self.labels[device_order[b * o.batch_size:(b + 1) * o.batch_size]]
            yield self.mix(images, labels, self._generator(b))

    def _source_batch(self, idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """What `fn.external_source` yields for the samples `idx`: here their uint8 pixels."""
        return self.images[idx]

    def _read(self, source: Callable[[], Iterator[np.ndarray | list[np.ndarray]]]):
        """The graph's input node: the source's images, uint8 HWC, on the pipeline's device."""
        from nvidia.dali import fn, types

        x = fn.external_source(source=source, batch=True, cycle="raise", layout="HWC", dtype=types.UINT8)
        return x.gpu() if self.device_id is not None else x

    def _output_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images `_read` gives."""
        return self.images.shape[1:]

    def pipeline(self, source: Callable[[], Iterator[np.ndarray | list[np.ndarray]]], seed: int):
        """The spec as a DALI graph: crop -> flip -> affine -> jitter (uint8 HWC) -> normalize (float CHW)
        -> erase."""
        from nvidia.dali import Pipeline, fn, types

        s = self.spec
        h, w, channels = self._output_shape()
        pipe = Pipeline(batch_size=self.options.batch_size, num_threads=max(1, self.options.num_workers),
                        device_id=self.device_id, seed=seed)
        with pipe:
            x = self._read(source)
            if s.crop.active:
                x = _pad_crop(x, s.crop.padding, s.crop.padding_mode, s.crop.fill, h, w)
            if s.flip.active:
                x = fn.flip(x, horizontal=fn.random.coin_flip(probability=s.flip.p))
            if s.affine.active:
                x = fn.warp_affine(x, matrix=_affine_matrix(s.affine, h, w), inverse_map=False, fill_value=0)
            if s.jitter.active:
                x = _jitter(x, s.jitter, rgb=channels == 3)
            x = fn.crop_mirror_normalize(x, mean=[m * 255 for m in self.mean], std=[v * 255 for v in self.std],
                                         output_layout="CHW", dtype=types.FLOAT)
            if s.erase.active:
                x = _erase(x, s.erase, h, w)
            pipe.set_outputs(x)
        return pipe


class DaliPhotoLoader(DaliLoader):
    """DALI over photos of varied sizes, decoded inside the pipeline (nvJPEG on the GPU, device "mixed";
    libjpeg-turbo with device_id=None): `fn.decoders.image_random_crop` (area 8-100%, aspect 3/4-4/3, as
    FFCV and torchvision) then a resize to the epoch's crop side for training; for evaluation, a resize of
    the shorter side to side / (224/256) and a centre crop. Records stored as pixels (FFCV's mixed mode)
    go in as binary PPM, which DALI's decoders read without loss. The rest of the graph is DaliLoader's."""

    def __init__(self, options: LoaderOptions):
        manifest = load_manifest(options.data_dir)
        self.beton = open_beton(options.data_dir, options.split, manifest, verify="off")
        self.memory = dali_need(self.beton, photos=True)
        check(self.memory, options.device, options.memory_budget_gb, PAGE_AWARE_FIX)
        labels = self.beton.labels()
        ShardedLoader.__init__(self, options, n=len(self.beton), mean=manifest["mean"], std=manifest["std"],
                               num_classes=len(manifest["classes"]), labels=labels)
        check_integrity(self.beton, manifest, options.split, options.verify, self.records_read())
        self.labels = torch.from_numpy(labels).to(options.device)
        self._setup_dali(manifest["mean"], manifest["std"], len(manifest["classes"]))

    def _source_batch(self, idx: np.ndarray) -> list[np.ndarray]:
        return [self._encoded(int(i)) for i in idx]

    def _encoded(self, i: int) -> np.ndarray:
        """Sample i as bytes DALI decodes: the stored JPEG, or the stored pixels behind a PPM header."""
        if self.beton.is_jpeg(i):
            return np.asarray(self.beton.stored_bytes(i))
        pixels = self.beton.image(i)
        header = f"P6\n{pixels.shape[1]} {pixels.shape[0]}\n255\n".encode()
        return np.concatenate([np.frombuffer(header, dtype=np.uint8), pixels.reshape(-1)])

    def _read(self, source: Callable[[], Iterator[list[np.ndarray]]]):
        from nvidia.dali import fn, types

        encoded = fn.external_source(source=source, batch=True, cycle="raise", dtype=types.UINT8)
        device = "mixed" if self.device_id is not None else "cpu"
        side = self.crop_side()
        if self.options.train:
            x = fn.decoders.image_random_crop(encoded, device=device, output_type=types.RGB,
                                              random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO),
                                              num_attempts=10)
            return fn.resize(x, size=[side, side])
        x = fn.decoders.image(encoded, device=device, output_type=types.RGB)
        x = fn.resize(x, resize_shorter=round(side / CENTER_CROP_RATIO))
        return fn.crop(x, crop=[side, side])

    def _output_shape(self) -> tuple[int, int, int]:
        side = self.crop_side()
        return (side, side, 3)


def _uniform(lo: float, hi: float):
    """One float per sample from U[lo, hi); the constant itself for an empty range (an unused affine part:
    DALI refuses the range [0, 0))."""
    from nvidia.dali import fn

    if lo == hi:
        return fn.constant(fdata=float(lo), shape=[])
    return fn.random.uniform(range=[lo, hi])


def _pad_crop(x, padding: int, mode: str, fill: int, h: int, w: int):
    """RandomCrop(size, padding): an (h, w) window at offsets uniform in [-padding, padding], read past
    the border with constant fill or reflection."""
    from nvidia.dali import fn, types

    offsets = list(range(-padding, padding + 1))
    dy = fn.random.uniform(values=offsets, dtype=types.INT32)
    dx = fn.random.uniform(values=offsets, dtype=types.INT32)
    # start/shape as named arguments: argument inputs live on the CPU, so a GPU graph needs no constant
    # uploaded for the window (positional anchor/shape inputs would be GPU data there)
    return fn.slice(x, start=fn.stack(dy, dx), shape=[h, w], axis_names="HW",
                    out_of_bounds_policy=OUT_OF_BOUNDS[mode], fill_values=float(fill))


def _affine_matrix(spec: AffineSpec, h: int, w: int):
    """RandomAffine's forward map about the image centre: shear, scale, rotate, then translate."""
    from nvidia.dali import fn

    center = [w / 2, h / 2]
    shear = _uniform(-spec.shear, spec.shear)
    scale = _uniform(*spec.scale)
    m = fn.transforms.shear(angles=fn.stack(shear, shear * 0), center=center)
    m = fn.transforms.scale(m, scale=fn.stack(scale, scale), center=center)
    m = fn.transforms.rotation(m, angle=_uniform(-spec.degrees, spec.degrees), center=center)
    offset = fn.stack(_uniform(-spec.translate, spec.translate) * w, _uniform(-spec.translate, spec.translate) * h)
    return fn.transforms.translation(m, offset=offset)


def _factor(strength: float):
    """A per-sample ColorJitter factor in [max(0, 1 - strength), 1 + strength], or 1 when off."""
    return _uniform(max(0.0, 1 - strength), 1 + strength) if strength > 0 else 1.0


def _jitter(x, spec: JitterSpec, rgb: bool):
    from nvidia.dali import fn

    if spec.brightness > 0 or spec.contrast > 0:
        x = fn.brightness_contrast(x, brightness=_factor(spec.brightness), contrast=_factor(spec.contrast))
    if rgb and (spec.saturation > 0 or spec.hue > 0):
        hue = _uniform(-spec.hue * 360, spec.hue * 360) if spec.hue > 0 else 0.0
        x = fn.hsv(x, saturation=_factor(spec.saturation), hue=hue)
    return x


def _erase(x, spec: EraseSpec, h: int, w: int):
    """RandomErasing on normalized CHW floats, drawn as in `pipelines.augment.random_erase`: area fraction
    ~ U(scale), log aspect ~ U(log ratio), box clipped to the image, erased with probability p (a box of
    size 0 otherwise)."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath

    area = _uniform(*spec.scale) * (h * w)
    aspect = dmath.exp(_uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1])))
    box_h = dmath.clamp(dmath.floor(dmath.sqrt(area * aspect) + 0.5), 1, h)
    box_w = dmath.clamp(dmath.floor(dmath.sqrt(area / aspect) + 0.5), 1, w)
    top = dmath.min(dmath.floor(_uniform(0, 1) * (h - box_h + 1)), h - box_h)
    left = dmath.min(dmath.floor(_uniform(0, 1) * (w - box_w + 1)), w - box_w)
    on = fn.random.coin_flip(probability=spec.p)
    region = {"anchor": fn.stack(top, left), "shape": fn.stack(box_h * on, box_w * on), "axis_names": "HW"}
    if spec.value != "random":
        return fn.erase(x, fill_value=float(spec.value), **region)
    inside = fn.erase(x * 0, fill_value=1.0, **region)  # 1 inside the box, 0 elsewhere
    return x + inside * (fn.random.normal(x) - x)
