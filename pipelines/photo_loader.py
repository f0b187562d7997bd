"""The photo backend: JPEG (and raw) records read straight from our own `.beton` reader and cut to crops with
nothing but the core's torch, torchvision and Pillow (and the compiled crop decoder where the install built it).
The shared device ops augment, as for every backend.

It produces what the ffcv and dali photo paths produce: for training, random-resized crops (area 8-100 %, aspect
3/4-4/3) at the epoch's side (progressive resizing included); for evaluation, FFCV's centre crop (224/256 of the
shorter side) resized to the side, the same box as the ffcv path; then flip, jitter, erasing, MixUp/CutMix from the
recipe on the device. Fixed-size sets keep their stored pixels (a JPEG set is decoded, nothing resized). Unlike
FFCV's crops, these are drawn on the host from a generator keyed by (seed, epoch, batch, rank): the same seed
gives the same batches, and a run resumed mid-epoch sees the crops of one that never stopped.

Hostile input keeps the reader's guarantees: `open_beton` checks every JPEG's frame header against the metadata
and every size against the pixel limit before anything is decoded, and a record that fails to decode stops the
run with one line naming it (the first failure in batch order, whichever thread met it); the decoding threads are
stopped before the error reaches the loop.

Two paths (`photo_decode` has the decoders):
- The host (the CPU, MPS): `num_workers` threads decode into one of PREFETCH + 1 batch buffers, a chunk of the
  batch each in one call of the compiled decoder, or a record each with Pillow (libjpeg-turbo's DCT scaling where
  the crop is 2-8 times the output);
  the loop takes batch b while the threads decode up to b + PREFETCH.
- The device (CUDA): one thread stages each batch's encoded bytes in pinned memory and runs `DeviceCrops` (one
  batched nvJPEG decode, batched resizes) on a side stream, up to PREFETCH batches ahead; torchvision's decode
  waits for nvJPEG in that thread, never in the loop, and the loop's stream waits on an event, not the host. The
  same path runs on the CPU when asked for (decoder="device"), which is how the tests check it without a GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from beton_trainer.common.errors import UserError
from beton_trainer.format.dataset import load_manifest, open_beton
from beton_trainer.format.integrity import check_integrity
from beton_trainer.pipelines.base import LoaderOptions, ShardedLoader, varied_sizes
from beton_trainer.pipelines.budget import PHOTO_FIX, check, largest_batch, photo_need
from beton_trainer.pipelines.crop_library import available, crop_batch
from beton_trainer.pipelines.photo_decode import (
    DEVICE_CHUNK,
    DeviceCrops,
    centre_boxes,
    pillow_crop,
    random_boxes,
    whole_boxes,
)

__all__ = ["DECODERS", "PREFETCH", "PhotoLoader"]

PREFETCH = 3  # batches decoded ahead of the one the loop takes (FFCV's batches_ahead)
CROP_STREAM = 0xC409  # the crop boxes' own random stream, apart from the device ops' and the order's
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)  # Pillow on a bad record
Ready = Callable[[], torch.Tensor]  # waits for a submitted batch: its uint8 NCHW crops on the device
DECODERS = ("device", "library", "pillow")


class PhotoLoader(ShardedLoader):
    """Implements `pipelines.base.Loader` over one split's `.beton` of RGB records, decoded as it goes. `decoder`:
    "device" (`photo_decode.DeviceCrops`; the default on CUDA), "library" (`crop_library.crop_batch` on threads,
    a chunk of each batch per thread; the default elsewhere where the compiled decoder is built) or "pillow"
    (`photo_decode.pillow_crop` on threads, a record each)."""

    def __init__(self, options: LoaderOptions, decoder: str = "auto"):
        manifest = load_manifest(options.data_dir)
        # frame headers and pixel limit checked here; the pages once the records read are known
        beton = open_beton(options.data_dir, options.split, manifest, verify="off")
        if beton.storage == "ndarray":
            raise UserError(f"{beton.path} holds one-channel arrays, which the photo loader does not decode; use "
                            "--loader tensor")
        if decoder == "auto":
            decoder = "device" if options.device.type == "cuda" else "library" if available() else "pillow"
        if decoder not in DECODERS or decoder == "library" and not available():
            raise UserError(f"photo decoder '{decoder}' is not one of {', '.join(DECODERS)} here (the library is "
                            "the compiled crop decoder, built by `pip install .` where a C compiler and libjpeg are)")
        labels = beton.labels()
        super().__init__(options, n=len(beton), mean=manifest["mean"], std=manifest["std"],
                         num_classes=len(manifest["classes"]), labels=labels)
        self.beton = beton
        self.decoder = decoder
        self.varied = varied_sizes(manifest)
        self.sizes = beton.sizes()
        self.pointers, self.lengths, self.jpeg = beton.pointers(), beton.record_sizes(), beton.jpeg_records()
        self.labels = torch.from_numpy(labels).to(options.device)
        side = max(self.crop_side(), options.resolution.max_res) if self.varied else 0
        self.memory = photo_need(beton, batch_size=options.batch_size, side=side, workers=max(1, options.num_workers),
                                 prefetch=PREFETCH, device_chunk=DEVICE_CHUNK if decoder == "device" else 0)
        check(self.memory, options.device, options.memory_budget_gb, PHOTO_FIX)
        check_integrity(beton, manifest, options.split, options.verify, self.records_read())

    def output_size(self) -> tuple[int, int]:
        """The (height, width) of this epoch's crops: the crop side, or the stored size of fixed-size data."""
        if self.varied:
            return (self.crop_side(),) * 2
        return tuple(int(v) for v in self.sizes[0])

    def boxes(self, idx: np.ndarray, batch: int) -> np.ndarray:
        """The crop box (top, left, height, width) of each record in `idx`, batch `batch` of this epoch."""
        sizes = self.sizes[idx]
        if not self.varied:
            return whole_boxes(sizes)
        if not self.options.train:
            return centre_boxes(sizes)
        o = self.options
        return random_boxes(sizes, np.random.default_rng([o.seed, self.epoch, batch, o.rank, CROP_STREAM]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.options
        order, start = self._take_order()
        if start >= self._len:
            return
        device_order = torch.from_numpy(order).to(o.device)  # one upload per epoch; batches slice it on the device
        on_device = self.decoder == "device"
        submit = self._device_decoder() if on_device else self._host_decoder()
        pool = ThreadPoolExecutor(1 if on_device else max(1, o.num_workers), thread_name_prefix="photo")
        pending: deque[tuple[int, Ready]] = deque()
        try:
            for b in range(start, self._len):
                pending.append((b, submit(pool, b, order[b * o.batch_size:(b + 1) * o.batch_size])))
                if len(pending) > PREFETCH:
                    yield self._batch(*pending.popleft(), device_order)
            while pending:
                yield self._batch(*pending.popleft(), device_order)
        finally:  # an epoch cut short or a record that failed: queued work is dropped, what runs ends (bounded)
            pool.shutdown(wait=True, cancel_futures=True)

    def _batch(self, b: int, ready: Ready, device_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.options.batch_size
        images = ready()  # raises the batch's first failure, as one line
        return self._augment(images, self.labels[device_order[b * size:(b + 1) * size]], b)

    def _unreadable(self, i: int, exc: BaseException) -> UserError:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return UserError(f"{self.beton.path}: record {i} could not be decoded ({detail}); convert the dataset "
                         "again with --force")

    # ---- the CPU (and MPS): the pool's threads decode into one of PREFETCH + 1 batch buffers, a chunk or a record
    # each ----

    def _host_decoder(self) -> Callable[[ThreadPoolExecutor, int, np.ndarray], Ready]:
        out, chunks = self.output_size(), max(1, self.options.num_workers)
        # tensors made now, before the steady state: the threads write into their arrays
        buffers = [torch.empty((self.options.batch_size, *out, 3), dtype=torch.uint8) for _ in range(PREFETCH + 1)]
        arrays = [buffer.numpy() for buffer in buffers]

        def submit(pool: ThreadPoolExecutor, b: int, idx: np.ndarray) -> Ready:
            slot = b % len(buffers)  # batch b - PREFETCH - 1's: consumed before b is submitted
            buffer, pixels, boxes = buffers[slot][:len(idx)], arrays[slot], self.boxes(idx, b)
            if self.decoder == "library":  # a contiguous chunk a thread, one call of the library each
                parts = [p for p in np.array_split(np.arange(len(idx)), chunks) if len(p)]
                futures = [pool.submit(self._library_into, pixels[p[0]:p[-1] + 1], idx[p], boxes[p], out)
                           for p in parts]
            else:
                futures = [pool.submit(self._pillow_into, pixels[k], int(i), boxes[k], out) for k, i in enumerate(idx)]

            def ready() -> torch.Tensor:
                for future in futures:
                    future.result()
                return buffer.to(self.options.device).permute(0, 3, 1, 2)
            return ready
        return submit

    def _library_into(self, dst: np.ndarray, idx: np.ndarray, boxes: np.ndarray, out: tuple[int, int]) -> None:
        refused = crop_batch(self.beton.mapped(), self.pointers[idx], self.lengths[idx], self.jpeg[idx],
                             self.sizes[idx], boxes, dst)
        if refused.size:  # not passed on to Pillow, which decodes damaged data libjpeg only warns about as made up
            raise self._unreadable(int(idx[refused[0]]), ValueError("the compiled decoder refused it: damaged data, "
                                                                     "or over its size or scan limits"))

    def _pillow_into(self, dst: np.ndarray, i: int, box: np.ndarray, out: tuple[int, int]) -> None:
        try:
            dst[...] = pillow_crop(self.beton.stored_bytes(i), bool(self.jpeg[i]), tuple(self.sizes[i]), box, out)
        except DECODE_ERRORS as exc:
            raise self._unreadable(i, exc) from None

    # ---- the device: the pool's one thread stages each batch (pinned on CUDA) and crops it (on a side stream) ----

    def _device_decoder(self) -> Callable[[ThreadPoolExecutor, int, np.ndarray], Ready]:
        device, out, size = self.options.device, self.output_size(), self.options.batch_size
        cuda = device.type == "cuda"
        crops, stream = DeviceCrops(device), torch.cuda.Stream(device) if cuda else None
        capacity = largest_batch(self.beton.record_sizes(), size)
        staging = [(torch.empty(capacity, dtype=torch.uint8, pin_memory=cuda),
                    torch.empty((size, 6), dtype=torch.float64, pin_memory=cuda)) for _ in range(PREFETCH + 1)]
        arrays = [(records.numpy(), geometry.numpy()) for records, geometry in staging]
        copied: list[torch.cuda.Event | None] = [None] * len(staging)  # CUDA: each slot's copies to the device, done

        def produce(b: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.cuda.Event | None]:
            slot = b % len(staging)
            if copied[slot] is not None:
                copied[slot].synchronize()  # this thread waits on an event: not a sync CUDA's debug mode counts
            stored = [self.beton.stored_bytes(int(i)) for i in idx]
            offsets = np.concatenate([[0], np.cumsum(self.lengths[idx])])
            np.concatenate(stored, out=arrays[slot][0][:offsets[-1]])
            arrays[slot][1][:len(idx)] = np.concatenate([self.sizes[idx], self.boxes(idx, b)], axis=1)
            jpeg = self.jpeg[idx]
            records, geometry = staging[slot]
            with torch.cuda.stream(stream):  # None (not CUDA): no stream
                try:
                    images = crops(records, offsets, jpeg, self.sizes[idx],
                                   geometry[:len(idx)].to(device, non_blocking=True), out)
                except (RuntimeError, ValueError) as exc:  # torchvision's decode refuses the batch as a whole
                    raise self._culprit(idx, jpeg, exc) from None
                if cuda:
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record(stream)
            return images, copied[slot]

        def submit(pool: ThreadPoolExecutor, b: int, idx: np.ndarray) -> Ready:
            future = pool.submit(produce, b, idx)

            def ready() -> torch.Tensor:
                images, done = future.result()
                if done is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(done)  # the loop's stream waits; the host does not
                    images.record_stream(current)  # made on the side stream, used on this one
                return images
            return ready
        return submit

    def _culprit(self, idx: np.ndarray, jpeg: np.ndarray, exc: Exception) -> UserError:
        """The one line for a batch the device's decoder refused: its first JPEG record Pillow cannot decode
        either, else the decoder's own message with the batch's records."""
        for i in idx[jpeg].tolist():
            try:
                pillow_crop(self.beton.stored_bytes(i), True, tuple(self.sizes[i]), whole_boxes(self.sizes[i:i + 1])[0],
                            (1, 1))
            except DECODE_ERRORS as error:
                return self._unreadable(i, error)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        ids = ", ".join(str(i) for i in idx[:8].tolist()) + (", ..." if len(idx) > 8 else "")
        return UserError(f"{self.beton.path}: the device's JPEG decoder failed on a batch of records ({ids}) that "
                         f"Pillow decodes ({detail}); train with --cpu, or convert the dataset again with --force")
