"""Label-aware smoothing (MiSLAS, Zhong et al., CVPR 2021, Eq. 9–10): class y's smoothing
ε_y = f(n_y) runs from ``smooth_tail`` (rarest class) to ``smooth_head`` (largest) along a concave,
linear, convex or power curve, and the loss is (1 − ε_y)·(−log p_y) + ε_y·mean_c(−log p_c) — the
official ``LabelAwareSmoothing``. With one class size only, every class gets ``smooth_head``."""
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ltsearch.config import ConfigError, spec
from ltsearch.recipes.losses.base import Loss
from ltsearch.recipes.protocol import LOSSES


def label_aware_smoothing(counts: torch.Tensor, head: float, tail: float, shape: str,
                          power: float = 1.0) -> torch.Tensor:
    n = counts.double()
    n1, nk = n.max(), n.min()
    if n1 == nk:
        return torch.full_like(n, head).float()
    r = (n - nk) / (n1 - nk)
    if shape == "concave":
        eps = tail + (head - tail) * torch.sin(r * math.pi / 2)
    elif shape == "linear":
        eps = tail + (head - tail) * r
    elif shape == "convex":
        eps = head + (head - tail) * torch.sin(1.5 * math.pi + r * math.pi / 2)
    else:  # "exp"
        eps = tail + (head - tail) * r.pow(power)
    return eps.float()


@dataclass
class LASParams:
    smooth_head: float = spec(0.3, ge=0.0, lt=1.0, doc="ε of the largest class")
    smooth_tail: float = spec(0.0, ge=0.0, lt=1.0, doc="ε of the rarest class")
    shape: Literal["concave", "linear", "convex", "exp"] = "concave"
    power: float = spec(1.0, gt=0.0, doc="shape=exp: ε ∝ r^power")

    def check(self):
        if self.smooth_tail > self.smooth_head:
            raise ConfigError("smooth_tail", f"must not exceed smooth_head ({self.smooth_head})")


@LOSSES.register
class LabelAwareSmoothing(Loss):
    name = "las"
    Params = LASParams

    def __init__(self, params, counts):
        super().__init__(params, counts)
        p = params
        self.smooth = label_aware_smoothing(counts, p.smooth_head, p.smooth_tail, p.shape, p.power)

    def per_sample(self, logits, y):
        logp = F.log_softmax(logits.float(), dim=-1)
        eps = self.smooth[y]
        nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
        return (1 - eps) * nll + eps * (-logp.mean(dim=-1))
