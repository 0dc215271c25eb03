"""τ-normalisation (Kang et al., ICLR 2020, §4): no training; at inference each classifier row
is divided by its norm to the power τ, w̃_c = w_c / ‖w_c‖^τ (τ = 1: cosine-like, τ = 0: unchanged),
so the head classes' larger norms stop dominating. The bias is dropped as in the official
classifier (no bias in the τ-normalised dot product)."""
from dataclasses import dataclass

import torch

from ltsearch.config import spec
from ltsearch.recipes.protocol import STAGE2
from ltsearch.recipes.stage2.base import Stage2


def tau_normalised(weight: torch.Tensor, tau: float) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


@dataclass
class TauNormParams:
    tau: float = spec(1.0, ge=0.0, doc="the power τ of the row norm")


@STAGE2.register
class TauNorm(Stage2):
    name = "tau_norm"
    Params = TauNormParams
    needs_linear_classifier = True

    def inference(self):
        return {"tau_norm": {"tau": self.params.tau}}

    def logits(self, model, x):
        w = tau_normalised(model.classifier.weight, self.params.tau)
        return model.embed(x) @ w.T
