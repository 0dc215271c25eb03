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
        self.x = shared(np.ascontiguousarray(images.x)).to(device)
        self.y = shared(images.y).to(device)
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

    def __len__(self):
        return len(self.y)

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None = None,
              augment: bool = True, view: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx``, augmented (training) or as they are; ``view``: one test-time view of
        them (:data:`TTA_VIEWS`)."""
        x = self.x[idx]
        if augment and self.crop_pad:
            x = random_crop(x, self.crop_pad, gen)
        x = x.float().div_(255.0)
        size = self.size or tuple(x.shape[2:])
        resized = False
        if augment and self.rrc is not None:  # a box per image, resized to the input size
            boxes = rrc_boxes(len(x), x.shape[2], x.shape[3], *self.rrc, gen, x.device)
            x, resized = crop_resize(x, boxes, size), True
        if augment and self.hflip:
            flip = torch.rand(len(x), device=x.device, generator=gen) < 0.5
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
        elif not resized:
            x = self._resized(x, size)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last), self.y[idx]

    def _resized(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        smooth = {} if self.interpolation == "nearest" else {"align_corners": False}
        return torch.nn.functional.interpolate(x, size=size, mode=self.interpolation, **smooth)


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


def channel_stats(images: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the training images, in [0, 1] units."""
    x = shared(images.x).float().div_(255.0)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def shared(a: np.ndarray) -> torch.Tensor:
    """A tensor over ``a``'s memory. In a trial worker ``a`` lies in Ray's object store, read-only
    and shared by every worker on the node; the trainer only reads it (batches are gathered
    into new tensors), so it is not copied and PyTorch's warning about tensors over
    non-writable arrays, which is about writing to them, is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(a)
