"""Class re-weighting and its schedule; the one place losses, weights and targets combine.

Weights (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019):
w_c ∝ 1/n_c (inverse), 1/√n_c (sqrt) or 1/E_{n_c} with the effective number
E_n = (1 − βⁿ)/(1 − β) (Eq. 3), normalised so Σ_c w_c = C (their code and LDAM-DRW's).

``start`` schedules them: from the first epoch (``always``: the class-balanced loss), from a later
one (deferred re-weighting, DRW: Cao et al., NeurIPS 2019, §3.2), or ``never``.

Two reductions, because the papers differ: Cui's code divides Σ_i w_{y_i}·ℓ_i by the batch size
(``normalize: batch``, TF's SUM_BY_NONZERO_WEIGHTS), LDAM-DRW's ``F.cross_entropy(weight=w)``
divides by Σ_i w_{y_i} (``normalize: weight_sum``). On CIFAR-10-LT at β = 0.9999 the second makes the
loss and the step about 5.8× smaller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from ltsearch.config import EPOCH_AT_DOC, EpochAt, spec


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
    else:
        raise ValueError(f"unknown weighting {scheme!r}")
    return (w * len(counts) / w.sum()).float()


@dataclass
class WeightsConfig:
    scheme: Literal["inverse", "sqrt", "effective"] = "effective"
    beta: float = spec(0.9999, ge=0.0, lt=1.0, doc="effective-number β (scheme=effective)")
    start: EpochAt = spec("always", doc="first weighted epoch: " + EPOCH_AT_DOC)
    normalize: Literal["batch", "weight_sum"] = spec(
        "batch", doc="divide Σ w·ℓ by the batch size (Cui et al.) or by Σ w (LDAM-DRW)")


def objective(loss, logits: torch.Tensor, targets: Sequence[tuple[torch.Tensor, object]],
              weights: Optional[torch.Tensor] = None, normalize: str = "batch") -> torch.Tensor:
    """Σ_t c_t · reduce(w_{y_t} · ℓ(z, y_t)) over targets (y_t, c_t): one target normally, mixup's
    λ / 1 − λ pair (Zhang et al. 2018) or BBN's α / 1 − α branch targets (Zhou et al. 2020, Eq. 3),
    each reduced as its paper's code does (a criterion per target)."""
    total = 0.0
    for y, coef in targets:
        per_sample = loss.per_sample(logits, y)
        if weights is None:
            term = per_sample.mean()
        else:
            w = weights[y]
            denom = w.sum() if normalize == "weight_sum" else len(y)
            term = (w * per_sample).sum() / denom
        total = total + coef * term
    return total
