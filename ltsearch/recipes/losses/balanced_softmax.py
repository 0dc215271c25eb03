"""Balanced softmax (Ren et al., NeurIPS 2020, Eq. 4): softmax cross-entropy on z + log n_c, as
the official code adds ``sample_per_class.log()`` to the logits. The same arm as the logit-adjusted
loss with τ = 1; kept under its own name because recipes cite it."""
import torch.nn.functional as F

from ltsearch.recipes.losses.base import Loss
from ltsearch.recipes.protocol import LOSSES


@LOSSES.register
class BalancedSoftmax(Loss):
    name = "balanced_softmax"

    def __init__(self, params, counts):
        super().__init__(params, counts)
        self.shift = counts.log()

    def per_sample(self, logits, y):
        return F.cross_entropy(logits.float() + self.shift, y, reduction="none")
