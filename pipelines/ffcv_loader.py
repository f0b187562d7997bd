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
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from common.errors import UserError
from pipelines.base import LoaderOptions, ShardedLoader


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
        self.grey = beton.storage == "ndarray"
        super().__init__(options, n=len(beton), mean=manifest["mean"], std=manifest["std"],
                         num_classes=len(manifest["classes"]))

    def _ffcv_loader(self, indices):
        """An FFCV Loader that visits exactly `indices`, in that order."""
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        device = self.options.device
        # Squeeze(1), not Squeeze(): a last batch of one sample must keep its batch dimension
        decoder = NDArrayDecoder() if self.grey else SimpleRGBImageDecoder()
        return Loader(
            str(self.path), batch_size=self.options.batch_size, num_workers=self.options.num_workers,
            order=OrderOption.SEQUENTIAL, indices=indices, os_cache=True, drop_last=self.options.train,
            pipelines={
                "image": [decoder, ToTensor(), ToDevice(device, non_blocking=True)],
                "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)],
            })

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order, start = self._take_order()
        if start >= self._len:
            return
        for b, (images, labels) in enumerate(self._ffcv_loader(order[start * o.batch_size:]), start):
            images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW view; the transform makes new tensors
            labels = labels.clone()  # FFCV reuses its output buffers a few batches later
            yield self._augment(images, labels, b)
