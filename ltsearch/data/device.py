"""Data kept on the trainer's device, augmented in batches there (no per-image PIL in the loop)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ltsearch.data.crops import centre_crop, crop_resize, rrc_boxes
from ltsearch.data.sources import ImageSet


class DeviceImages:
    """A uint8 image tensor on ``device`` with batched pad-and-crop, flip and normalisation;
    batches come channels_last, the layout the trainer's convolutions run fastest in on CPU
    (oneDNN) and GPU alike."""

    def __init__(self, images: ImageSet, device: torch.device, mean: torch.Tensor,
                 std: torch.Tensor, crop_pad: int = 0, hflip: bool = False,
                 size: tuple[int, int] | None = None, interpolation: str = "bilinear",
                 channels: int | None = None, rrc: tuple | None = None,
                 eval_crop_pct: float | None = None):
        self._store(images, device)
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)
        self.crop_pad = crop_pad
        self.hflip = hflip
        # a pretrained backbone's input: resized here, one batch at a time (the stored images
        # stay at their size), a grey image repeated to the channels the backbone was trained on
        self.size = tuple(size) if size is not None else None  # (None: the stored size)
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.channels = channels
        self.rrc = rrc  # (scale, ratio) of random-resized-crop training boxes, or None
        self.eval_crop_pct = eval_crop_pct

    @property
    def augments(self) -> bool:
        """Whether training batches differ from the images as they are."""
        return bool(self.crop_pad or self.hflip or self.rrc)

    def _store(self, images: ImageSet, device: torch.device) -> None:
        self.x = shared(np.ascontiguousarray(images.x)).to(device)
        self.y = shared(images.y).to(device)

    def __len__(self):
        return len(self.y)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored uint8 images ``idx``, on the device."""
        return self.x[idx]

    def steps(self, order: torch.Tensor, batch_size: int):
        """``order`` in batches: (indices, what :meth:`batch` takes as ``raw``; None here, where
        the images are on the device already)."""
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size], None

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None = None,
              augment: bool = True, view: tuple | None = None,
              raw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx``, augmented (training) or as they are; ``view``: one test-time view of
        them (:func:`tta_views`); ``raw``: their stored images, read already (:meth:`steps`)."""
        x = self._rows(idx) if raw is None else raw  # uint8; values stay in 0–255 until normalised
        if augment and self.crop_pad:
            x = random_crop(x, self.crop_pad, gen)
        size = self.size or tuple(x.shape[2:])
        boxes = flip = None
        if augment and self.rrc is not None:  # a box per image, resized to the input size
            boxes = rrc_boxes(len(x), x.shape[2], x.shape[3], *self.rrc, gen, x.device)
        if augment and self.hflip:
            flip = torch.rand(len(x), device=x.device, generator=gen) < 0.5
        normalized = False
        if boxes is not None:  # (mirrored as it is cut, normalised as it is made where it can be)
            normalized = self.channels is None or x.shape[1] == self.channels
            x = crop_resize(x, boxes, size, flip, self._affine() if normalized else None)
        elif flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if self.channels is not None and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        if view is not None and view[0] == "flip":
            x = x.flip(3)
        if view is not None and view[0] == "crop":  # LIFT's: resize to size + e, crop one of five
            _, corner, e = view
            x = self._resized(x, (size[0] + e, size[1] + e))
            top, left = ((0, 0), (0, e), (e, 0), (e, e), (round(e / 2), round(e / 2)))[corner]
            x = x[:, :, top:top + size[0], left:left + size[1]]
        elif not augment and self.eval_crop_pct is not None:
            x = centre_crop(x, size, self.eval_crop_pct, self._resized)
        elif boxes is None:
            x = self._resized(x, size)
        return (x if normalized else self._normalized(x)), self.y[idx]

    def _resized(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        smooth = {} if self.interpolation == "nearest" else {"align_corners": False}
        return torch.nn.functional.interpolate(x.float(), size=size, mode=self.interpolation, **smooth)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel, (1, C, 1, 1): 0–255 values to normalised ones."""
        return 1.0 / (255.0 * self.std), -self.mean / self.std

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """(x / 255 − mean) / std as one multiply-add from 0–255 values (uint8 or float), made
        channels_last. A channels_last uint8 batch is read as rows of W·C values, each scaled
        by the channels' constants repeated W times: the same arithmetic, vectorised along the
        row instead of over three channels (2–3× faster on the CPU)."""
        scale, shift = self._affine()
        if x.dtype == torch.uint8 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
            B, C, H, W = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(B, H, W * C).float()
            torch.addcmul(shift.view(C).repeat(W), rows, scale.view(C).repeat(W), out=rows)
            return rows.view(B, H, W, C).permute(0, 3, 1, 2)
        out = x.float()  # (a new tensor where x is uint8 or an expanded view; x's own where not)
        if out is x:
            return torch.addcmul(shift, x, scale).contiguous(memory_format=torch.channels_last)
        return torch.addcmul(shift, out, scale, out=out).contiguous(memory_format=torch.channels_last)


def tta_views(mode: str, expand: int = 24) -> list[tuple | None]:
    """The views an evaluation averages the logits of: the image itself; with its mirror image
    (``flip``); LIFT's five crops (Shi et al. 2024, ``tte_mode: fivecrop``: resized to the input
    size + ``expand``, then torchvision's FiveCrop order: the four corners and the centre)."""
    if mode == "flip":
        return [None, ("flip",)]
    if mode == "five_crop":
        return [("crop", k, expand) for k in range(5)]
    return [None]


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back to H×W at a random offset per image, in one gather."""
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device, generator=gen)
    rows = oy + torch.arange(H, device=x.device)  # (B, H)
    cols = ox + torch.arange(W, device=x.device)  # (B, W)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


STATS_SAMPLE = 8192  # images the channel statistics are taken over, evenly spaced


def channel_stats(images, sample: int = STATS_SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of the training images in [0, 1] units: of every
    image up to ``sample`` of them, else of ``sample`` evenly spaced ones; read in chunks and
    summed in float64, so a cached set larger than memory is never read whole."""
    n = len(images)
    pick = np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(np.int64))
    total = np.zeros(images.channels)
    squares = np.zeros(images.channels)
    for start in range(0, len(pick), 256):
        x = images.read(pick[start:start + 256]).astype(np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
    count = len(pick) * int(np.prod(images.image_shape[1:]))
    mean = total / count
    var = np.maximum(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    return (torch.tensor(mean, dtype=torch.float32),
            torch.tensor(np.sqrt(var), dtype=torch.float32).clamp_min(1e-3))


def shared(a: np.ndarray) -> torch.Tensor:
    """A tensor over ``a``'s memory. In a trial worker ``a`` lies in Ray's object store, read-only
    and shared by every worker on the node; the trainer only reads it (batches are gathered
    into new tensors), so it is not copied and PyTorch's warning about tensors over
    non-writable arrays, which is about writing to them, is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(a)
