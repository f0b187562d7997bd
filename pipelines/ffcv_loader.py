"""The FFCV backend: FFCV reads and decodes the `.beton` in its compiled worker threads, the shared device
ops augment.

Sample order. FFCV can shuffle and shard by itself (`OrderOption.RANDOM`/`QUASI_RANDOM` with
`distributed=True`), but then the order comes from FFCV's own RNG and sharding (DistributedSampler
semantics, padding included), which the other backends cannot reproduce and which cannot resume in
the middle of an epoch. Instead this rank's sample list comes from `pipelines.base.rank_indices` and is
passed as `indices=` with `OrderOption.SEQUENTIAL`: the order is ours (seeded per epoch, the same
shards as the tensor and DALI backends), and a resume at batch k just drops the first k * batch_size
indices. For a .beton larger than memory allows (`data.order = "page_aware"`, or "auto"), the order is
`pipelines.base.page_aware_indices`, shuffled within blocks of pages as FFCV's QUASI_RANDOM is but seeded,
sharded and resumable like ours, and FFCV runs with os_cache off: its process cache then reads each page
once an epoch and holds about two blocks (`pipelines.budget` checks that figure before FFCV starts).
FFCV's Loader is built once and given each epoch's list (the first build in a process pays FFCV's numba JIT).

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

import mmap
import os
import queue
import threading
import traceback
from collections.abc import Iterator

import torch

from beton_trainer.common.errors import UserError
from beton_trainer.format.beton import CONVERT_AGAIN, BetonFile
from beton_trainer.format.integrity import check_integrity
from beton_trainer.pipelines.base import (
    CENTER_CROP_RATIO,
    RRC_RATIO,
    RRC_SCALE,
    LoaderOptions,
    ShardedLoader,
    default_block_pages,
    record_pages,
    varied_sizes,
)
from beton_trainer.pipelines.budget import (
    ALLOCATION_FIX,
    PAGE_AWARE_FIX,
    allocation_error,
    allocations,
    check,
    choose_order,
    decode_bytes,
    ffcv_need,
    largest_image,
    out_of_memory,
    record_bytes,
)

__all__ = ["FfcvLoader"]

CLOSE_WAIT_S = 60.0  # an epoch's close waits this long at most for FFCV's thread to finish its batch


class FfcvLoader(ShardedLoader):
    """Implements `pipelines.base.Loader` over one split's `.beton`, read by FFCV."""

    def __init__(self, options: LoaderOptions):
        from beton_trainer.format.dataset import load_manifest, open_beton

        manifest = load_manifest(options.data_dir)
        # checked against the manifest before FFCV reads it; its pages once the records read are known
        beton = open_beton(options.data_dir, options.split, manifest, verify="off")
        self.path = beton.path
        super().__init__(options, n=len(beton), mean=manifest["mean"], std=manifest["std"],
                         num_classes=len(manifest["classes"]), labels=beton.labels())
        self.varied = varied_sizes(manifest)
        self.ffcv_loader = None  # FFCV's own Loader, built at the first epoch (tests look at its parts)
        self.decoder = self._image_decoder(grey=beton.storage == "ndarray")
        self._plan_memory(beton)
        check_integrity(beton, manifest, options.split, options.verify, self.records_read())

    def _plan_memory(self, beton: BetonFile) -> None:
        """Choose the order (random or page-aware) and os_cache, then refuse before FFCV starts when the pages
        they keep at once, the batches in flight and (photos) the decode buffers for the largest image the file's
        headers allow do not fit in free host memory."""
        o = self.options
        order = choose_order(o.order, beton, o.memory_budget_gb)
        if order == "page_aware":
            self.pages = record_pages(beton)
            self.block_pages = o.block_pages or default_block_pages(beton.page_size)
        self.os_cache = self.pages is None if o.os_cache is None else o.os_cache
        side = max(self.crop_side(), o.resolution.max_res)
        sample_bytes = side * side * 3 if self.varied else record_bytes(beton)
        whole_file = self.os_cache and self.pages is None
        workers = (o.num_workers or os.cpu_count() or 1) if self.varied else 0  # FFCV: 0 workers = every CPU
        self.memory = ffcv_need(beton, None if whole_file else self.epoch_order(0), os_cache=self.os_cache,
                                batch_size=o.batch_size, sample_bytes=sample_bytes, decode_workers=workers)
        fix = PAGE_AWARE_FIX if self.pages is None else \
            f"lower data.order_block_pages (now {self.block_pages}) or data.batch_size"
        if workers and decode_bytes(beton, batch_size=o.batch_size, workers=workers) > self.memory.host_bytes / 2:
            height, width = largest_image(beton)
            fix = (f"convert the photos again with a smaller --max-side (and --force), or lower data.batch_size: "
                   f"FFCV sets aside room for the largest image the file's headers allow ({height}x{width}) for "
                   "every image in flight")
        check(self.memory, o.device, o.memory_budget_gb, fix)

    def _image_decoder(self, grey: bool):
        """Stored pixels as they are for fixed-size data; for photos of varied sizes, crop-and-resize decoders
        straight to a square of side `crop_side()` (set again each epoch: progressive resizing)."""
        from ffcv.fields.decoders import NDArrayDecoder

        from beton_trainer.pipelines.crop_decode import FixedSizeDecoder, photo_decoders

        if grey:
            return NDArrayDecoder()
        if not self.varied:
            return FixedSizeDecoder()
        side = (self.crop_side(),) * 2
        random_crop, centre_crop = photo_decoders()
        if self.options.train:
            return random_crop(side, scale=RRC_SCALE, ratio=RRC_RATIO)
        return centre_crop(side, ratio=CENTER_CROP_RATIO)

    def _build_ffcv_loader(self, first_order):
        """The FFCV Loader, built once (its numba pipeline and memory manager cost ~1 s a build); each
        epoch gives its SEQUENTIAL traversal that epoch's order as `indices`. Its length comes from `first_order`,
        a full epoch's order, so the shorter order of a mid-epoch resume is never cut.

        The copy to the device blocks FFCV's worker thread (never the training loop's): FFCV decodes into
        a ring of pinned host slots, and a non-blocking copy could still be queued behind a lagging GPU
        when the slot is decoded into again, a few batches later. The worker waits on an event
        (`_waiting_to_device`), which CUDA's sync debug mode, process-wide under --check-syncs, does not
        count as a sync of the training thread.
        """
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor

        _report_worker_errors()
        device = self.options.device
        to_device = _waiting_to_device()
        # Squeeze(1), not Squeeze(): a last batch of one sample must keep its batch dimension
        return Loader(
            str(self.path), batch_size=self.options.batch_size, num_workers=self.options.num_workers,
            order=OrderOption.SEQUENTIAL, indices=first_order, os_cache=self.os_cache, drop_last=self.options.train,
            pipelines={
                "image": [self.decoder, ToTensor(), to_device(device)],
                "label": [IntDecoder(), ToTensor(), Squeeze(1), to_device(device)],
            })

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order, start = self._take_order()
        if start >= self._len:
            return
        if self.varied:  # FFCV sizes its buffers from output_size when an epoch starts (as ffcv-imagenet does);
            self.decoder.output_size = (self.crop_side(),) * 2  # its compiled code takes sizes from the buffers
        threads = torch.get_num_threads()  # FFCV sets torch's to its worker count in both calls below
        with allocations("ffcv", ALLOCATION_FIX):  # FFCV allocates its buffers for the epoch here
            if self.ffcv_loader is None:
                self.ffcv_loader = self._build_ffcv_loader(order)
            self.ffcv_loader.traversal_order.indices = order[start * o.batch_size:]  # Sequential visits these
            epoch = iter(self.ffcv_loader)
        torch.set_num_threads(threads)  # the training loop owns torch's CPU threads
        try:
            for b, (images, labels) in enumerate(epoch, start):
                images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW view; the transform makes new tensors
                labels = labels.clone()  # FFCV reuses its output buffers a few batches later
                yield self._augment(images, labels, b)
        finally:
            epoch.close()  # an epoch cut short (max_steps_per_epoch) stops FFCV's thread now, not at collection

    def unmap_page_cache(self) -> None:
        """Let the kernel drop the pages FFCV's os_cache memory map holds (it keeps mapped pages, and FFCV keeps
        the map open for its Loader's life): for measuring epochs from a cold page cache. Nothing to do before
        the first epoch or without os_cache."""
        manager = getattr(self.ffcv_loader, "memory_manager", None)
        memory_map = getattr(getattr(manager, "context", None), "mmap", None)
        if memory_map is not None:
            memory_map._mmap.madvise(mmap.MADV_DONTNEED)  # numpy's memmap has no public way to reach its mmap


class LoaderWorkerError(UserError):
    """FFCV's worker thread failed: the training loop stops with this instead of waiting for a batch forever."""


def _waiting_to_device():
    """FFCV's ToDevice, whose copy the worker thread waits for on a CUDA event.

    A blocking `copy_` ends in a stream synchronize, which CUDA's sync debug mode (process-wide) turns into
    an error inside FFCV's thread under --check-syncs; an event wait is not among the calls that mode
    checks (torch's CUDAEvent::synchronize). The wait is the same: the copy on the worker's stream, and
    what that stream waits for. Only a GPU can confirm it (benchmarks/device/README.md).
    """
    from ffcv.transforms import ToDevice

    class WaitingToDevice(ToDevice):
        def __init__(self, device: torch.device) -> None:
            super().__init__(device, non_blocking=True)

        def generate_code(self):
            copy = super().generate_code()
            cuda = torch.device(self.device).type == "cuda"

            def to_device(inp, dst):
                dst = copy(inp, dst)
                if cuda:
                    done = torch.cuda.Event()
                    done.record()  # on the worker's current stream, FFCV's per-slot stream
                    done.synchronize()
                return dst
            return to_device

    return WaitingToDevice


def _report_worker_errors() -> None:
    """Make FFCV's epoch threads hand any exception to the consumer, and stop before their epoch is closed
    (once per process).

    FFCV 1.0.2's EpochIterator.run catches only StopIteration: any other exception ends the thread, and
    the consumer waits forever in `output_queue.get()`. The subclass queues FFCV's own end-of-epoch marker and
    keeps the exception, and its `__next__` raises it as one line: a JPEG record that does not decode
    (`crop_decode.UndecodableRecord`) names the record, a failed allocation says so, anything else also prints
    the thread's traceback. FFCV's `close` only asks the thread to stop, so the thread could go on decoding
    into memory the close frees, or still be inside torch when the interpreter exits (a daemon thread there
    aborts the process: `terminate called without an active exception`, SIGABRT, the report of a failed test
    lost); here `close` waits for it. FFCV's Loader builds its iterators by this module-level name, so it is
    replaced there.
    """
    import ffcv.loader.loader as ffcv_loader_module
    from ffcv.loader.epoch_iterator import EpochIterator

    from beton_trainer.pipelines.crop_decode import UndecodableRecord

    if getattr(ffcv_loader_module.EpochIterator, "reports_errors", False):
        return

    class Closed(Exception):
        """The epoch was closed: the thread makes no more batches."""

    class ReportingEpochIterator(EpochIterator):
        reports_errors = True
        error: BaseException | None = None

        def run(self) -> None:
            try:
                super().run()
            except Closed:
                return
            except BaseException as exc:  # anything: the consumer must hear of it
                if not isinstance(exc, UndecodableRecord) and not out_of_memory(exc):  # those are one line
                    traceback.print_exc()
                self.error = exc
                while not self.terminate_event.is_set():  # the consumer drains the queue, or has closed it
                    try:
                        self.output_queue.put(None, timeout=0.5)
                        return
                    except queue.Full:
                        continue

        def __next__(self):
            try:
                return super().__next__()
            except StopIteration:
                if self.error is None:
                    raise
                error, path = self.error, self.loader.fname
                if isinstance(error, UndecodableRecord):
                    raise UserError(f"{path}: record {error.args[0]} is not a readable JPEG (libjpeg reported an "
                                    f"error or corrupt data decoding it); {CONVERT_AGAIN}") from None
                if out_of_memory(error):
                    raise allocation_error("ffcv", error, ALLOCATION_FIX) from None
                first = (str(error).strip().splitlines() or [""])[0]
                raise LoaderWorkerError(f"the ffcv loader's worker thread failed ({type(error).__name__}: "
                                        f"{first}; its traceback is above); fix that, or train with --loader "
                                        "tensor") from error

        def run_pipeline(self, *args):  # FFCV's loop looks at terminate_event only while its queue is full
            if self.terminate_event.is_set():
                raise Closed
            return super().run_pipeline(*args)

        def close(self) -> None:
            self.terminate_event.set()
            while True:  # room for a batch the thread waits to queue: it then stops before the next one
                try:
                    self.output_queue.get_nowait()
                except queue.Empty:
                    break
            if self.is_alive() and threading.current_thread() is not self:
                self.join(CLOSE_WAIT_S)
            super().close()

    ffcv_loader_module.EpochIterator = ReportingEpochIterator
