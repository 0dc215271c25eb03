"""Input mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) for single-branch
recipes, as their official code does it: λ ~ Beta(α, α) per batch, the batch mixed with a random
permutation of itself, and the loss λ·ℓ(z, y) + (1 − λ)·ℓ(z, y_perm). CutMix pastes a box of side
√(1 − λ) (clipped at the border) and sets λ to the uncovered share of the image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from ltsearch.config import EPOCH_AT_DOC, EpochAt, spec


@dataclass
class MixupConfig:
    alpha: float = spec(1.0, gt=0.0, doc="λ ~ Beta(α, α)")
    kind: Literal["mixup", "cutmix"] = "mixup"
    until: EpochAt = spec("never", doc="first epoch without mixing ('never': mix all of stage 1): "
                                       + EPOCH_AT_DOC)


def cutmix_box(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of CutMix's ``rand_bbox``: a box of side ratio √(1 − λ) centred at
    (cy, cx), clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    y1, y2 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
    x1, x2 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
    return int(y1), int(y2), int(x1), int(x2)


class Mixer:
    """Per-epoch draws (λ and CutMix centres from the run's numpy rng), per-step mixing."""

    def __init__(self, cfg: MixupConfig):
        self.cfg = cfg
        self.lams: np.ndarray = np.empty(0)
        self.centres: np.ndarray = np.empty((0, 2))

    def start_epoch(self, steps: int, rng: np.random.Generator) -> None:
        self.lams = rng.beta(self.cfg.alpha, self.cfg.alpha, size=steps)
        self.centres = rng.random((steps, 2))

    def mix(self, x: torch.Tensor, y: torch.Tensor, step: int,
            gen: Optional[torch.Generator]) -> tuple[torch.Tensor, list]:
        lam = float(self.lams[step])
        perm = torch.randperm(len(y), device=y.device, generator=gen)
        if self.cfg.kind == "mixup":
            mixed = lam * x + (1 - lam) * x[perm]
        else:
            h, w = x.shape[-2:]
            cy, cx = (self.centres[step] * (h, w)).astype(int)
            y1, y2, x1, x2 = cutmix_box(h, w, lam, cy, cx)
            mixed = x.clone()
            mixed[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
            lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        return mixed, [(y, lam), (y[perm], 1.0 - lam)]
