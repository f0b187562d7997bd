"""The device-resident loader: the whole uint8 split lives on the training device (as in airbench).

Each batch is an index_select plus the batched augmentation ops of `pipelines.augment`, all on the
device, so there are no workers, no host copies and no host-device syncs after the one upload.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import BetonFile
from beton_trainer.format.dataset import Split, load_manifest, open_beton
from beton_trainer.pipelines.base import ArrayLoader, LoaderOptions, ShardedLoader, varied_sizes
from beton_trainer.pipelines.budget import TENSOR_CHUNK, USE_FFCV, allocations, check, tensor_need

__all__ = ["TensorLoader"]


class TensorLoader(ArrayLoader):
    """Implements `pipelines.base.Loader` over a split held on `options.device`."""

    def __init__(self, options: LoaderOptions, split: Split | None = None):
        if split is not None:  # arrays already in memory: one upload, the NHWC -> NCHW transpose on the device
            super().__init__(options, split)
            host = np.require(self.split.images, requirements=["C", "W"])
            self.images = torch.from_numpy(host).to(options.device).permute(0, 3, 1, 2).contiguous()
            return
        manifest = load_manifest(options.data_dir)
        if varied_sizes(manifest):
            raise UserError(f"{options.data_dir} holds images of varied sizes, which the tensor loader cannot hold "
                            "as one array; use --loader photo, ffcv or dali (they crop and resize while decoding)")
        beton = open_beton(options.data_dir, options.split, manifest, verify=options.verify)  # reads every record
        self.memory = tensor_need(beton)
        check(self.memory, options.device, options.memory_budget_gb, USE_FFCV)
        labels = beton.labels()
        ShardedLoader.__init__(self, options, n=len(beton), mean=manifest["mean"], std=manifest["std"],
                               num_classes=len(manifest["classes"]), labels=labels)
        self.labels = torch.from_numpy(labels).to(options.device)
        with allocations("tensor", USE_FFCV):
            self.images = self._upload(beton, options.device)

    @staticmethod
    def _upload(beton: BetonFile, device: torch.device) -> torch.Tensor:
        """The split as one uint8 NCHW tensor on `device`, filled chunk by chunk from the file (transposed on
        the device): the host never holds a second whole copy, so a run's peak memory is the split once."""
        h, w, c = beton.image_shape()
        images = torch.empty((len(beton), c, h, w), dtype=torch.uint8, device=device)
        for start, chunk in beton.chunks(TENSOR_CHUNK):
            if device.type == "cpu":  # numpy's strided copy transposes ~3x faster than torch's here
                np.copyto(images.numpy()[start:start + len(chunk)], chunk.transpose(0, 3, 1, 2))
            else:
                images[start:start + len(chunk)] = torch.from_numpy(chunk).to(device).permute(0, 3, 1, 2)
        return images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order, start = self._take_order()
        order = torch.from_numpy(order).to(o.device)
        for b in range(start, self._len):
            idx = order[b * o.batch_size:(b + 1) * o.batch_size]
            yield self._augment(self.images.index_select(0, idx), self.labels.index_select(0, idx), b)
