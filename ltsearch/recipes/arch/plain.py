"""The plain network: body → pool → one classifier, trained on one index stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ltsearch.config import spec
from ltsearch.models import ImageClassifier
from ltsearch.recipes.protocol import ARCHS, Part


@dataclass
class PlainParams:
    classifier: Literal["linear", "normed"] = spec(
        "linear", doc="normed: LDAM-DRW's cosine classifier (no bias)")


@ARCHS.register
class Plain(Part):
    name = "plain"
    Params = PlainParams
    single_branch = True

    def __init__(self, params, ctx):
        self.params = params
        self.ctx = ctx

    def build_model(self, build_body):
        body, feat_dim = build_body()
        return ImageClassifier(body, feat_dim, self.ctx.num_classes, self.params.classifier)

    def samplers(self, first, epoch, total):
        return [first]

    def start_epoch(self, epoch, total, steps, rng):
        pass

    def forward(self, model, batches, step):
        b = batches[0]
        return model(b.x), [(b.y, 1.0)]

    def epoch_metrics(self):
        return {}
