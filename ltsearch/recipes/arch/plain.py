"""The plain network: body → pool → one classifier, trained on one index stream.

The classifier is linear, LDAM-DRW's normed one, or a scaled cosine classifier (LIFT's,
Shi et al., ICML 2024, ``models/classifiers.py``: z_c = s·cos(f, w_c), s = 25), and starts from
random weights, from the class names' text features (an OpenCLIP backbone, LIFT's
``init_head_text_feat``: "a photo of a {}." through the text tower, mapped to the image
features' width) or from the normalised mean feature of each class's training images
(LIFT's ``init_head_class_mean``, any backbone; computed when training starts, not on resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltsearch.config import spec
from ltsearch.models import ImageClassifier
from ltsearch.recipes.protocol import ARCHS, Part

HeadName = Literal["linear", "normed", "cosine"]


@dataclass
class HeadParams:
    name: HeadName = spec("linear", doc="normed: LDAM-DRW's cosine classifier (no scale, no "
                          "bias); cosine: scale · cos (LIFT's)")
    scale: float = spec(25.0, gt=0.0, doc="cosine: the logits' scale s (LIFT's 25)")
    init: Literal["random", "text", "class_mean"] = spec(
        "random", doc="text: the class names through an OpenCLIP text tower; class_mean: each "
                      "class's mean training feature")
    template: str = spec("a photo of a {}.", doc="init text: the prompt around a class name")


@dataclass
class PlainParams:
    classifier: Union[HeadName, HeadParams] = spec(
        "linear", doc="a name, or {name, scale, init, template}")


def head_of(params) -> HeadParams:
    """The classifier's settings whichever way they were given (a name, or a mapping)."""
    c = getattr(params, "classifier", "linear")
    return c if isinstance(c, HeadParams) else HeadParams(name=c)


@ARCHS.register
class Plain(Part):
    name = "plain"
    Params = PlainParams
    single_branch = True

    def __init__(self, params, ctx):
        self.params = params
        self.head = head_of(params)
        self.ctx = ctx

    def build_model(self, build_body):
        body, feat_dim = build_body()
        h = self.head
        model = ImageClassifier(body, feat_dim, self.ctx.num_classes, h.name, scale=h.scale)
        if h.init == "text" and self.ctx.initialise:
            with torch.no_grad():
                model.classifier.weight.copy_(body.text_features(self.ctx.classes, h.template))
                if getattr(model.classifier, "bias", None) is not None:
                    model.classifier.bias.zero_()
        if hasattr(body, "release_text"):  # a CLIP's text tower: not needed past here
            body.release_text()
        return model

    @torch.no_grad()
    def on_train_start(self, model: nn.Module) -> None:
        """``init: class_mean``: each class's mean feature of its (unaugmented) training
        images, normalised, as the classifier's weights (bias 0)."""
        if self.head.init != "class_mean":
            return
        from contextlib import nullcontext

        from ltsearch.features import embed_all

        f = embed_all(model, self.ctx.train, 256, nullcontext)
        sums = torch.zeros(self.ctx.num_classes, f.x.shape[1], device=f.x.device).index_add_(0, f.y, f.x)
        counts = torch.bincount(f.y, minlength=self.ctx.num_classes).clamp_min(1)
        model.classifier.weight.copy_(F.normalize(sums / counts[:, None], dim=1))
        if getattr(model.classifier, "bias", None) is not None:
            model.classifier.bias.zero_()

    def samplers(self, first, epoch, total):
        return [first]

    def start_epoch(self, epoch, total, steps, rng):
        pass

    def forward(self, model, batches, step):
        b = batches[0]
        return model(b.x), [(b.y, 1.0)]

    def epoch_metrics(self):
        return {}
