"""The loss part's shape: per-sample losses from logits, labels and the class counts.

Class weights, mixup's two targets and BBN's two branch targets are applied around it
(:func:`ltsearch.recipes.weights.objective`), which is what lets any loss compose with them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ltsearch.recipes.protocol import Part


class Loss(Part):
    decay_bias = True  # False: the classifier bias is exempt from weight decay

    def __init__(self, params, counts: torch.Tensor):
        self.params = params
        self.counts = counts  # float32, on the training device

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bias_init(self, num_classes: int) -> Optional[float]:
        """A starting value for the classifier bias, or None for PyTorch's default."""
        return None
