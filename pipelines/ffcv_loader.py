"""The FFCV backend: FFCV reads and decodes the `.beton` in its compiled worker threads, the shared device
ops augment.

Sample order. FFCV can shuffle and shard by itself (`OrderOption.RANDOM`/`QUASI_RANDOM` with
`distributed=True`), but then the order comes from FFCV's own RNG and sharding (DistributedSampler
semantics, padding included), which the other backends cannot reproduce and which cannot resume in
the middle of an epoch. Instead this rank's sample list comes from `pipelines.base.rank_indices` and is
passed as `indices=` with `OrderOption.SEQUENTIAL`: the order is ours (seeded per epoch, the same
shards as the tensor and DALI backends), and a resume at batch k just drops the first k * batch_size
indices. FFCV's Loader is rebuilt for each epoch with that epoch's list; building one costs
milliseconds once the pipeline code is compiled (the first build in a process pays FFCV's numba JIT).

Augmentation. FFCV's own CPU crop/flip/cutout ops are not used: decoded uint8 batches go to the device
as early as possible (`ToDevice` right after `ToTensor`) and every augmentation runs there through the
same `TrainTransform` as the tensor backend, keyed by the same `batch_generator(seed, epoch, batch,
rank)`. One spec, one implementation: with the same seed the ffcv and tensor backends yield identical
batches.

Photos of varied sizes (the manifest records no image_shape) are decoded straight to square crops, as in
ffcv-imagenet: random-resized crops for training (area 8-100%, aspect 3/4-4/3) and centre crops (224/256 of
the shorter side) for evaluation, by FFCV's decoders with the decoding of only the crop from
`pipelines.crop_decode`; the device ops follow. The crop
side can change between epochs (progressive resizing): the decoder's `output_size` is set before each
epoch, and FFCV sizes its buffers from it when the epoch starts. These crops are drawn by FFCV's own
per-thread numba generator, which cannot be keyed by (seed, epoch, batch): the order and the device ops stay
reproducible, the crop positions do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from common.errors import UserError
from pipelines.base import (
    CENTER_CROP_RATIO,
    RRC_RATIO,
    RRC_SCALE,
    LoaderOptions,
    ShardedLoader,
    varied_sizes,
)


class FfcvLoader(ShardedLoader):
    """Implements `pipelines.base.Loader` over one split's `.beton`, read by FFCV."""

    def __init__(self, options: LoaderOptions):
        from pipelines.dataset import BetonFile, load_manifest

        manifest = load_manifest(options.data_dir)
        if options.split not in manifest["splits"]:
            raise UserError(f"{options.data_dir} has no '{options.split}' split; "
                            f"present: {', '.join(sorted(manifest['splits']))}")
        self.path = Path(options.data_dir) / f"{options.split}.beton"
        beton = BetonFile(self.path)  # one-line errors for a missing or corrupt file, before FFCV sees it
        super().__init__(options, n=len(beton), mean=manifest["mean"], std=manifest["std"],
                         num_classes=len(manifest["classes"]))
        self.varied = varied_sizes(manifest)
        self._loader = None  # FFCV's Loader, built at the first epoch
        self.decoder = self._image_decoder(grey=beton.storage == "ndarray")

    def _image_decoder(self, grey: bool):
        """Stored pixels as they are for fixed-size data; for photos of varied sizes, crop-and-resize decoders
        straight to a square of side `crop_side()` (set again each epoch: progressive resizing)."""
        from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder

        from pipelines.crop_decode import CenterCropDecoder, RandomResizedCropDecoder

        if grey:
            return NDArrayDecoder()
        if not self.varied:
            return SimpleRGBImageDecoder()
        side = (self.crop_side(),) * 2
        if self.options.train:
            return RandomResizedCropDecoder(side, scale=RRC_SCALE, ratio=RRC_RATIO)
        return CenterCropDecoder(side, ratio=CENTER_CROP_RATIO)

    def _ffcv_loader(self, first_order):
        """The FFCV Loader, built once (its numba pipeline and memory manager cost ~1 s a build); each
        epoch gives its SEQUENTIAL traversal that epoch's order as `indices`. Its length comes from `first_order`,
        a full epoch's order, so the shorter order of a mid-epoch resume is never cut.

        The copy to the device blocks FFCV's worker thread (never the training loop's): FFCV decodes into
        a ring of pinned host slots, and a non-blocking copy could still be queued behind a lagging GPU
        when the slot is decoded into again, a few batches later.
        """
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        device = self.options.device
        # Squeeze(1), not Squeeze(): a last batch of one sample must keep its batch dimension
        return Loader(
            str(self.path), batch_size=self.options.batch_size, num_workers=self.options.num_workers,
            order=OrderOption.SEQUENTIAL, indices=first_order, os_cache=True, drop_last=self.options.train,
            pipelines={
                "image": [self.decoder, ToTensor(), ToDevice(device, non_blocking=False)],
                "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=False)],
            })

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order, start = self._take_order()
        if start >= self._len:
            return
        if self.varied:  # FFCV sizes its buffers from output_size when an epoch starts (as ffcv-imagenet does);
            self.decoder.output_size = (self.crop_side(),) * 2  # its compiled code takes sizes from the buffers
        threads = torch.get_num_threads()  # FFCV sets torch's to its worker count in both calls below
        if self._loader is None:
            self._loader = self._ffcv_loader(order)
        self._loader.traversal_order.indices = order[start * o.batch_size:]  # Sequential visits these
        epoch = iter(self._loader)
        torch.set_num_threads(threads)  # the training loop owns torch's CPU threads
        try:
            for b, (images, labels) in enumerate(epoch, start):
                images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW view; the transform makes new tensors
                labels = labels.clone()  # FFCV reuses its output buffers a few batches later
                yield self._augment(images, labels, b)
        finally:
            epoch.close()  # an epoch cut short (max_steps_per_epoch) stops FFCV's thread now, not at collection

