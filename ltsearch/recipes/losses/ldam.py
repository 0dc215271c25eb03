"""LDAM: label-distribution-aware margins (Cao et al., NeurIPS 2019, Eq. 12–13).

m_c = C / n_c^{1/4}, with C set so the largest margin is ``max_m``; the true class's logit is
lowered by its margin and the logits are scaled by ``s`` before softmax cross-entropy — as the
official ``LDAMLoss``: ``F.cross_entropy(s · (z − m_y·onehot_y), y)``. The official recipe pairs it
with a cosine (normed) classifier, the ``ldam_drw`` preset's ``arch: {classifier: normed}``.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltsearch.config import spec
from ltsearch.recipes.losses.base import Loss
from ltsearch.recipes.protocol import LOSSES


def ldam_margins(counts: torch.Tensor, max_m: float) -> torch.Tensor:
    m = 1.0 / counts.double().pow(0.25)
    return (m * (max_m / m.max())).float()


def ldam_logits(logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor, s: float) -> torch.Tensor:
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return s * (logits - onehot * margins[y].unsqueeze(1))


@dataclass
class LDAMParams:
    max_m: float = spec(0.5, gt=0.0, doc="the largest margin (the rarest class's)")
    s: float = spec(30.0, gt=0.0, doc="logit scale")


@LOSSES.register
class LDAM(Loss):
    name = "ldam"
    Params = LDAMParams

    def __init__(self, params, counts):
        super().__init__(params, counts)
        self.margins = ldam_margins(counts, params.max_m)

    def per_sample(self, logits, y):
        return F.cross_entropy(ldam_logits(logits.float(), y, self.margins, self.params.s), y,
                               reduction="none")
