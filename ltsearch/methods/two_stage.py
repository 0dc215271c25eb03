"""Two-stage re-balancing: learn features on the imbalanced data first, re-balance late.

- ``drw``: deferred re-weighting — CE, then effective-number weights from ``defer_epoch``
  (Cao et al., NeurIPS 2019, §3.2).
- ``drs``: deferred re-sampling — instance sampling, then ``sampler`` from ``defer_epoch``.
- ``crt``: classifier re-training — after the whole first stage, freeze the features,
  re-initialise the classifier and train it for ``crt_epochs`` with class-balanced sampling
  (Kang et al., "Decoupling Representation and Classifier", ICLR 2020, §4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ltsearch.config import ConfigError, spec
from ltsearch.methods.base import Method, Phase, classifier_phase, register
from ltsearch.methods.reweight import class_weights, weighted_loss


@dataclass
class TwoStageParams:
    variant: Literal["drw", "drs", "crt"] = "drw"
    defer_epoch: int = spec(160, ge=0, doc="drw/drs: first re-balanced epoch (0-based)")
    beta: float = spec(0.9999, ge=0.0, lt=1.0, doc="drw: effective-number β")
    sampler: Literal["balanced", "sqrt", "reversed", "progressive"] = "balanced"
    crt_epochs: int = spec(10, ge=1, doc="crt: classifier re-training epochs")
    crt_lr: float = spec(0.1, gt=0.0, doc="crt: classifier learning rate (cosine to 0)")


@register
class TwoStage(Method):
    name = "two_stage"
    Params = TwoStageParams

    @classmethod
    def check_config(cls, params, train):
        if params.variant in ("drw", "drs") and params.defer_epoch >= train.epochs:
            raise ConfigError("defer_epoch",
                              f"must be below train.epochs ({train.epochs}), got {params.defer_epoch}")

    @classmethod
    def extra_epochs(cls, params):
        return params.crt_epochs if params.variant == "crt" else 0

    def __init__(self, params, ctx, train):
        super().__init__(params, ctx, train)
        self.weights = class_weights(ctx.counts, "effective", params.beta).to(ctx.device)

    def phases(self):
        stage1 = [Phase("stage1", self.train_cfg)]
        if self.params.variant != "crt":
            return stage1
        return stage1 + [classifier_phase("crt", self.params.crt_epochs, self.params.crt_lr,
                                          self.train_cfg, reset=True)]

    def _deferred(self, phase, epoch):
        return phase.name == "stage1" and epoch >= self.params.defer_epoch

    def samplers(self, phase, epoch):
        if phase.name == "crt":
            return [self.sampler("balanced")]
        if self.params.variant == "drs" and self._deferred(phase, epoch):
            return [self.sampler(self.params.sampler)]
        return [self.sampler("instance")]

    def loss(self, model, batches, phase, epoch, step):
        b = batches[0]
        use_weights = self.params.variant == "drw" and self._deferred(phase, epoch)
        return weighted_loss(model(b.x), b.y, self.weights if use_weights else None)
