"""Focal loss on the sigmoid (Lin et al. 2017), as Cui et al. use it (CVPR 2019, Eq. 8):
Σ_c (1 − p_t)^γ · BCE, with the sigmoid's bias start −log(C − 1) and no bias decay."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltsearch.config import spec
from ltsearch.recipes.losses.base import Loss
from ltsearch.recipes.losses.sigmoid import prior_bias, sigmoid_terms
from ltsearch.recipes.protocol import LOSSES


@dataclass
class FocalParams:
    gamma: float = spec(1.0, ge=0.0, doc="focusing parameter γ (0: the sigmoid loss)")


@LOSSES.register
class Focal(Loss):
    name = "focal"
    Params = FocalParams
    decay_bias = False

    def per_sample(self, logits, y):
        bce, onehot = sigmoid_terms(logits, y)
        if self.params.gamma > 0:
            # (1 − p_t)^γ = exp(γ · log σ(−z_t)), z_t = ±z toward each binary task's label:
            # finite gradients where σ saturates (pow would give 0·∞ = NaN for γ < 1).
            z_t = torch.where(onehot > 0, logits.float(), -logits.float())
            bce = bce * torch.exp(self.params.gamma * F.logsigmoid(-z_t))
        return bce.sum(dim=1)

    def bias_init(self, num_classes):
        return prior_bias(num_classes)
