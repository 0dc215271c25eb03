"""Sigmoid cross-entropy over one-hot targets, summed over classes (Cui et al., CVPR 2019,
Eq. 6). As in the official code the classifier bias starts at b = −log(C − 1), so every class
starts at the prior p = 1/C (their §4.2: "to avoid instability at the beginning"), and the bias
is exempt from weight decay."""
import math

import torch.nn.functional as F

from ltsearch.recipes.losses.base import Loss
from ltsearch.recipes.protocol import LOSSES


def sigmoid_terms(logits, y):
    """Per-class binary cross-entropy terms (N, C) and the one-hot targets."""
    logits = logits.float()
    onehot = F.one_hot(y, logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(logits, onehot, reduction="none"), onehot


def prior_bias(num_classes: int) -> float:
    return -math.log(max(num_classes - 1, 1))


@LOSSES.register
class Sigmoid(Loss):
    name = "sigmoid"
    decay_bias = False

    def per_sample(self, logits, y):
        return sigmoid_terms(logits, y)[0].sum(dim=1)

    def bias_init(self, num_classes):
        return prior_bias(num_classes)
