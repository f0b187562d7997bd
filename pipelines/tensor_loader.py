"""The device-resident loader: the whole uint8 split lives on the training device (as in airbench).

Each batch is an index_select plus the batched augmentation ops of `pipelines.augment`, all on the
device, so there are no workers, no host copies and no host-device syncs after the one upload.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.errors import UserError
from pipelines.base import ArrayLoader, LoaderOptions, varied_sizes
from pipelines.dataset import Split, load_manifest


class TensorLoader(ArrayLoader):
    """Implements `pipelines.base.Loader` over a split held on `options.device`."""

    def __init__(self, options: LoaderOptions, split: Split | None = None):
        if split is None and varied_sizes(load_manifest(options.data_dir)):
            raise UserError(f"{options.data_dir} holds images of varied sizes, which the tensor loader cannot hold "
                            "as one array; use --loader ffcv or --loader dali (they crop and resize while decoding)")
        super().__init__(options, split)
        # one upload (copying on the host only if the array is read-only, e.g. a memory map);
        # the NHWC -> NCHW transpose runs on the device
        host = np.require(self.split.images, requirements=["C", "W"])
        self.images = torch.from_numpy(host).to(options.device).permute(0, 3, 1, 2).contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order, start = self._take_order()
        order = torch.from_numpy(order).to(o.device)
        for b in range(start, self._len):
            idx = order[b * o.batch_size:(b + 1) * o.batch_size]
            yield self._augment(self.images.index_select(0, idx), self.labels.index_select(0, idx), b)
