"""BBN: Bilateral-Branch Network with cumulative learning (Zhou et al., CVPR 2020).

Two branches share the trunk (everything up to the last residual block); each has its own copy
of that block. The conventional branch sees instance-sampled images, the re-balancing branch
images drawn by the reversed sampler (p_c ∝ n_max/n_c, Eq. 1). The classifier sees
[2α·f_c, 2(1−α)·f_r], i.e. z = α·W_c f_c + (1−α)·W_r f_r (Eq. 2), and the loss is
α·CE(z, y_c) + (1−α)·CE(z, y_r) (Eq. 3). α follows the cumulative-learning adaptor (Eq. 4 and the
alternatives of Table 2 and the reference code), a searchable schedule here. At inference both
branches see the same image with α = 0.5.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltsearch.config import ConfigError, spec
from ltsearch.methods.base import Method, register
from ltsearch.models import split_last_block

Schedule = Literal["parabolic_decay", "linear_decay", "cosine_decay", "parabolic_increment",
                   "equal", "beta", "separated"]


def adaptor(schedule: str, epoch: int, total: int, switch_epoch: int = 0) -> float:
    """α at 1-based ``epoch`` T of ``total`` T_max epochs (the ``beta`` schedule is drawn per
    step instead, see :meth:`BBN.start_epoch`)."""
    r = epoch / total
    if schedule == "parabolic_decay":
        return 1.0 - r * r
    if schedule == "linear_decay":
        return 1.0 - r
    if schedule == "cosine_decay":
        return math.cos(r * math.pi / 2)
    if schedule == "parabolic_increment":
        return r * r
    if schedule == "equal":
        return 0.5
    if schedule == "separated":
        return 1.0 if epoch <= switch_epoch else 0.0
    raise ValueError(f"schedule {schedule!r} has no closed form")


class BBNNet(nn.Module):
    def __init__(self, body: nn.Sequential, feat_dim: int, num_classes: int):
        super().__init__()
        self.trunk, last = split_last_block(body)
        self.branch_c = last
        self.branch_r = copy.deepcopy(last)
        self.classifier = nn.Linear(2 * feat_dim, num_classes)

    @staticmethod
    def _pool(x):
        return x.mean(dim=(2, 3))

    def branch_features(self, x_c, x_r):
        return self._pool(self.branch_c(self.trunk(x_c))), self._pool(self.branch_r(self.trunk(x_r)))

    def mix(self, f_c, f_r, alpha):
        return self.classifier(torch.cat([2 * alpha * f_c, 2 * (1 - alpha) * f_r], dim=1))

    def forward(self, x, x_r=None, alpha=None):
        if x_r is None:  # inference: one trunk pass feeds both branches, α = 0.5
            t = self.trunk(x)
            return self.mix(self._pool(self.branch_c(t)), self._pool(self.branch_r(t)), 0.5)
        return self.mix(*self.branch_features(x, x_r), alpha)


@dataclass
class BBNParams:
    schedule: Schedule = "parabolic_decay"
    beta_a: float = spec(0.2, gt=0.0, doc="a of Beta(a, a) (schedule=beta)")
    switch_epoch: int = spec(120, ge=0, doc="last epoch with α = 1 (schedule=separated)")
    second_sampler: Literal["reversed", "balanced"] = "reversed"


@register
class BBN(Method):
    name = "bbn"
    Params = BBNParams

    @classmethod
    def check_config(cls, params, train):
        if params.schedule == "separated" and params.switch_epoch > train.epochs:
            raise ConfigError("switch_epoch", f"must not exceed train.epochs ({train.epochs})")

    def build_model(self, body, feat_dim):
        self.model = BBNNet(body, feat_dim, self.ctx.num_classes)
        return self.model

    def samplers(self, phase, epoch):
        return [self.sampler("instance"), self.sampler(self.params.second_sampler)]

    def start_epoch(self, phase, epoch, steps, rng):
        p = self.params
        if p.schedule == "beta":
            values = rng.beta(p.beta_a, p.beta_a, size=steps)
        else:
            values = np.full(steps, adaptor(p.schedule, epoch + 1, phase.optim.epochs, p.switch_epoch))
        self.alpha_mean = float(values.mean())
        self.alphas = torch.as_tensor(values, dtype=torch.float32, device=self.ctx.device)

    def loss(self, model, batches, phase, epoch, step):
        conv, rebal = batches
        alpha = self.alphas[step]
        z = model(conv.x, rebal.x, alpha).float()
        return alpha * F.cross_entropy(z, conv.y) + (1 - alpha) * F.cross_entropy(z, rebal.y)

    def epoch_metrics(self, phase, epoch):
        return {"alpha": self.alpha_mean}
