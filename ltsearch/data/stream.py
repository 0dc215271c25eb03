"""Images read from the node's decoded cache a batch at a time: a dataset larger than memory
trains with a worker's memory flat in its size.

Each batch's rows are gathered from the cache's memory map (the page cache; after the first
epoch nothing is read from disk where the node's memory holds the cache) into a pinned buffer
and copied to the GPU on a side stream, one batch ahead of the step that uses it, on a thread
of its own; augmentation then runs on the device exactly as for images held there
(:class:`ltsearch.data.device.DeviceImages`, whose arithmetic this shares: the same batches
give the same numbers). Reading draws no random numbers, so reading ahead changes nothing.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ltsearch.data.cache import MappedSet
from ltsearch.data.device import DeviceImages
from ltsearch.data.sources import ImageSet

RESIDENT_SHARE = 0.25  # of the GPU's free memory a cached set may fill to be held there whole


class StreamedImages(DeviceImages):
    """A :class:`MappedSet` batched as :class:`DeviceImages` are. On a GPU with room for it
    (``resident``: by default a quarter of its free memory) the set is uploaded whole, in
    chunks (no host copy of it), and batches are gathered there."""

    resident: bool | None = None  # None: decided by the GPU's free memory

    def _store(self, images: MappedSet, device: torch.device) -> None:
        self.mapped = images
        self.device = device
        self.y = torch.as_tensor(images.y).to(device)
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None
        resident = self.resident
        if resident is None:
            resident = self.cuda and images.nbytes <= RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]
        self.x = self._upload() if resident else None

    def _upload(self, chunk: int = 1024) -> torch.Tensor:
        x = torch.empty((len(self.mapped), *self.mapped.image_shape), dtype=torch.uint8,
                        device=self.device).contiguous(memory_format=torch.channels_last)
        for start in range(0, len(x), chunk):
            part = np.arange(start, min(start + chunk, len(x)))
            x[start:start + len(part)] = torch.from_numpy(self.mapped.read(part))
        return x

    def _read(self, idx: np.ndarray):
        """(uint8 images ``idx`` on the device, the event their copy ends at or None)."""
        if not self.cuda:
            return torch.from_numpy(self.mapped.read(idx)), None
        c, h, w = self.mapped.image_shape
        host = torch.empty((len(idx), h, w, c), dtype=torch.uint8, pin_memory=True)
        self.mapped.read(idx, out=host.numpy())
        host = host.permute(0, 3, 1, 2)  # (channels_last, as stored; kept so on the device)
        with torch.cuda.stream(self._side):
            x = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side)
        return x, done

    def _ready(self, x: torch.Tensor, done) -> torch.Tensor:
        if done is not None:  # the step's stream waits for the copy; the allocator knows of it
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)
        return x

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.x is not None:
            return self.x[idx]
        return self._ready(*self._read(idx.cpu().numpy()))

    def steps(self, order: torch.Tensor, batch_size: int):
        """``order`` in batches, each read while the one before it trains."""
        if self.x is not None:
            yield from super().steps(order, batch_size)
            return
        host = order.cpu().numpy()  # the epoch's one device→host copy of its indices
        starts = range(0, len(host), batch_size)
        with ThreadPoolExecutor(1, thread_name_prefix="ltsearch-read") as reader:
            ahead = reader.submit(self._read, host[:batch_size]) if len(host) else None
            for start in starts:
                x, done = ahead.result()
                following = start + batch_size
                if following < len(host):
                    ahead = reader.submit(self._read, host[following:following + batch_size])
                yield order[start:following], self._ready(x, done)


def images_on(images: ImageSet | MappedSet, device: torch.device, *args, **kwargs) -> DeviceImages:
    """The trainer's view of a set: held on the device, or read from the cache a batch at a time."""
    kind = StreamedImages if isinstance(images, MappedSet) else DeviceImages
    return kind(images, device, *args, **kwargs)
