"""Logit-adjusted loss (Menon et al., ICLR 2021, Eq. 10): softmax cross-entropy on
z + τ·log π, π the training class priors n_c / N. τ = 1 is balanced softmax (Ren et al. 2020):
log π_c and log n_c differ by log N, which the softmax cancels."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltsearch.config import spec
from ltsearch.recipes.losses.base import Loss
from ltsearch.recipes.protocol import LOSSES


def log_priors(counts: torch.Tensor) -> torch.Tensor:
    return (counts.double() / counts.double().sum()).log().float()


@dataclass
class LogitAdjustParams:
    tau: float = spec(1.0, ge=0.0, doc="τ; 1 is the Bayes-consistent value (and balanced softmax)")


@LOSSES.register
class LogitAdjust(Loss):
    name = "logit_adjust"
    Params = LogitAdjustParams

    def __init__(self, params, counts):
        super().__init__(params, counts)
        self.shift = params.tau * log_priors(counts)

    def per_sample(self, logits, y):
        return F.cross_entropy(logits.float() + self.shift, y, reduction="none")
