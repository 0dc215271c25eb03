"""Class re-weighting (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
CVPR 2019).

Weights w_c ∝ 1/n_c (inverse), 1/√n_c (sqrt) or 1/E_{n_c} with the effective number
E_n = (1 − βⁿ)/(1 − β) (Eq. 3), normalised so Σ_c w_c = C. Losses: softmax cross-entropy,
sigmoid binary cross-entropy over one-hot targets, and focal loss (Lin et al. 2017) on the
sigmoid, as in Cui et al. Eq. 7–8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ltsearch.config import spec
from ltsearch.methods.base import Method, register


def effective_number(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """E_n = (1 − βⁿ)/(1 − β); β = 0 gives 1 for every class (no re-weighting)."""
    counts = counts.double()
    return (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts)) / (1.0 - beta)


def class_weights(counts, scheme: str, beta: float = 0.9999) -> torch.Tensor:
    """Per-class loss weights, normalised to sum to the number of classes."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if scheme == "inverse":
        w = 1.0 / counts
    elif scheme == "sqrt":
        w = 1.0 / counts.sqrt()
    elif scheme == "effective":
        w = 1.0 / effective_number(counts, beta)
    elif scheme == "none":
        w = torch.ones_like(counts)
    else:
        raise ValueError(f"unknown weighting {scheme!r}")
    return (w * len(counts) / w.sum()).float()


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None,
                  loss: str = "softmax", gamma: float = 0.0) -> torch.Tensor:
    """Softmax CE (weighted mean, PyTorch's convention), or sigmoid BCE / focal summed over
    classes, scaled by w_y and averaged over the batch (Cui et al. Eq. 7–8)."""
    logits = logits.float()
    if loss == "softmax":
        return F.cross_entropy(logits, y, weight=weights)
    onehot = F.one_hot(y, logits.shape[1]).float()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    if loss == "focal" and gamma > 0:
        # (1 − p_t)^γ = exp(γ · log σ(−z_t)), z_t = ±z toward the true label of each binary
        # task: finite gradients even where σ saturates (pow would give 0·∞ = NaN for γ < 1).
        z_t = torch.where(onehot > 0, logits, -logits)
        bce = bce * torch.exp(gamma * F.logsigmoid(-z_t))
    per_sample = bce.sum(dim=1)
    if weights is not None:
        per_sample = per_sample * weights[y]
    return per_sample.mean()


@dataclass
class ReweightParams:
    weighting: Literal["inverse", "sqrt", "effective"] = "effective"
    beta: float = spec(0.9999, ge=0.0, lt=1.0, doc="effective-number β (weighting=effective)")
    loss: Literal["softmax", "sigmoid", "focal"] = "softmax"
    gamma: float = spec(1.0, ge=0.0, doc="focal γ (loss=focal)")


@register
class Reweight(Method):
    name = "reweight"
    Params = ReweightParams

    def __init__(self, params, ctx, train):
        super().__init__(params, ctx, train)
        self.weights = class_weights(ctx.counts, params.weighting, params.beta).to(ctx.device)

    def loss(self, model, batches, phase, epoch, step):
        b = batches[0]
        return weighted_loss(model(b.x), b.y, self.weights, self.params.loss, self.params.gamma)
