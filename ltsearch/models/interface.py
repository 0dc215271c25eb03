"""What a pretrained body tells the rest: the input it expects (:class:`Preprocess`) and, for a
vision transformer, where its parts are (:class:`ViTView`), so that a fine-tuning part reads one
shape whichever library built the network (timm, OpenCLIP)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects of its input: images are resized on the device to ``size``
    with ``interpolation`` and normalised with ``mean``/``std`` (3 channels: a grey image is
    repeated). ``None`` fields: the data's own size and statistics (a network trained from
    scratch)."""
    size: Optional[tuple[int, int]] = None
    interpolation: str = "bilinear"
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    channels: Optional[int] = None


@dataclass
class ViTView:
    """A ViT's blocks and the modules of each that the parts act on. Tokens are (N, L, D) as
    the blocks see them (``seq_dim`` 1), or (L, N, D) (``seq_dim`` 0)."""
    blocks: list[nn.Module]
    dim: int
    patch_pixels: int  # p², pixels per patch
    final_norm: nn.Module  # applied to the tokens after the last block, before pooling
    norm2: Callable[[nn.Module], nn.Module]  # the norm before a block's MLP
    mlp: Callable[[nn.Module], nn.Module]
    qkv: Optional[Callable[[nn.Module], tuple[nn.Module, str]]] = None  # (module, name) of one
    #   (3d, d) q, k, v weight, if the attention has one
    seq_dim: int = 1
