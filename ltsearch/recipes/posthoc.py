"""Post-hoc logit adjustment (Menon et al., ICLR 2021, Eq. 6): predict argmax_c z_c − τ·log π_c,
π the training priors. Applied at every evaluation; training is untouched."""
from __future__ import annotations

from dataclasses import dataclass

from ltsearch.config import spec


@dataclass
class PosthocConfig:
    logit_adjust: float = spec(1.0, ge=0.0, doc="τ of z − τ·log π")


def adjust_logits(logits, log_priors, tau: float):
    return logits - tau * log_priors
