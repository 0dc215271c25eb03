"""BBN: Bilateral-Branch Network with cumulative learning (Zhou et al., CVPR 2020).

Two branches share the trunk (everything up to the last residual block); each has its own last
block, initialised independently as in the official code (two blocks built by the network's
constructor, not a copy). The conventional branch sees the recipe's sampler (instance by
default), the re-balancing branch the reversed sampler (p_c ∝ n_max/n_c, Eq. 1). The classifier
sees [2α·f_c, 2(1−α)·f_r], i.e. z = α·W_c f_c + (1−α)·W_r f_r (Eq. 2), and the loss is
α·ℓ(z, y_c) + (1−α)·ℓ(z, y_r) (Eq. 3) for any loss part. α follows the cumulative-learning adaptor
(Eq. 4 and the alternatives of Table 2), a searchable schedule. At inference both branches see
the same image with α = 0.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from ltsearch.config import EPOCH_AT_DOC, EpochAt, resolve_epoch, spec
from ltsearch.data.samplers import Draw, make_sampler
from ltsearch.models import split_last_block
from ltsearch.recipes.protocol import ARCHS, Part

Schedule = Literal["parabolic_decay", "linear_decay", "cosine_decay", "parabolic_increment",
                   "equal", "beta", "separated"]


def adaptor(schedule: str, epoch: int, total: int, switch_epoch: int = 0) -> float:
    """α at 1-based ``epoch`` T of ``total`` T_max epochs: 1 − (T/T_max)² for the paper's
    parabolic decay (Eq. 4; the official code uses (T−1)/T_max, one epoch earlier). The ``beta``
    schedule is drawn per step instead (:meth:`Bilateral.start_epoch`)."""
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


INFERENCE_ALPHA = 0.5  # both branches see the image, weighted equally (the official test mode)


class BBNNet(nn.Module):
    def __init__(self, body: nn.Sequential, second_body: nn.Sequential, feat_dim: int,
                 num_classes: int):
        super().__init__()
        self.trunk, self.branch_c = split_last_block(body)
        self.branch_r = second_body[-1][-1]  # the same block, from an independently built net
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
            return self.mix(self._pool(self.branch_c(t)), self._pool(self.branch_r(t)), INFERENCE_ALPHA)
        return self.mix(*self.branch_features(x, x_r), alpha)


@dataclass
class BilateralParams:
    schedule: Schedule = "parabolic_decay"
    beta_a: float = spec(0.2, gt=0.0, doc="a of Beta(a, a) (schedule=beta)")
    switch_epoch: EpochAt = spec(0.6, doc="last epoch with α = 1 (schedule=separated): "
                                          + EPOCH_AT_DOC)
    second_sampler: Literal["reversed", "balanced"] = "reversed"


@ARCHS.register
class Bilateral(Part):
    name = "bilateral"
    Params = BilateralParams
    single_branch = False
    metrics = ("alpha",)

    def __init__(self, params, ctx):
        self.params = params
        self.ctx = ctx
        self.alphas = torch.ones(0)
        self.alpha_mean = 1.0

    def build_model(self, build_body):
        body, feat_dim = build_body()
        second, _ = build_body()
        return BBNNet(body, second, feat_dim, self.ctx.num_classes)

    def samplers(self, first, epoch, total):
        return [first, Draw(make_sampler(self.params.second_sampler, self.ctx.index), epoch, total)]

    def start_epoch(self, epoch, total, steps, rng):
        p = self.params
        if p.schedule == "beta":
            values = rng.beta(p.beta_a, p.beta_a, size=steps)
        else:
            switch = resolve_epoch(p.switch_epoch, total)
            switch = total if switch is None else switch
            values = np.full(steps, adaptor(p.schedule, epoch + 1, total, switch))
        self.alpha_mean = float(values.mean())
        self.alphas = torch.as_tensor(values, dtype=torch.float32, device=self.ctx.device)

    def forward(self, model, batches, step):
        conv, rebal = batches
        alpha = self.alphas[step]
        return model(conv.x, rebal.x, alpha), [(conv.y, alpha), (rebal.y, 1 - alpha)]

    def inference(self):
        return {"bbn_alpha": INFERENCE_ALPHA}

    def epoch_metrics(self):
        return {"alpha": self.alpha_mean}
