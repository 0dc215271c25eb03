"""The fine-tuning part's shape. A part may add modules to the model once it is built (after
its pretrained weights are loaded) and says which parameters stage 1 trains; the classifier
always trains. The trainer names no part: it trains what :meth:`FineTune.trainable` returns.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch.nn as nn

from ltsearch.config import ConfigError
from ltsearch.models.interface import ViTView
from ltsearch.recipes.protocol import Part


class FineTune(Part):
    frozen_body: ClassVar[bool] = False  # the body is frozen and in eval mode (a linear probe)
    needs_blocks: ClassVar[bool] = False  # acts on a ViT's transformer blocks
    needs_qkv: ClassVar[bool] = False  # on their attention's one q, k, v projection (a Linear)
    any_arch: ClassVar[bool] = False  # composes with any arch part (BBN's two branches too)

    def __init__(self, params):
        self.params = params
        self.added: list[nn.Parameter] = []  # parameters the part added to the model

    @classmethod
    def check(cls, params, backbone: dict, key: str) -> None:
        """Refuse a backbone the part cannot act on (``backbone``: :func:`ltsearch.models.describe`)."""
        if cls.needs_blocks and not backbone["blocks"]:
            raise ConfigError(key, f"finetune {cls.name!r} acts on a ViT's transformer blocks; "
                                   "this backbone has none (a timm or OpenCLIP ViT has)")
        if cls.needs_qkv and not backbone["qkv"]:
            raise ConfigError(key, f"finetune {cls.name!r} acts on one q, k, v projection weight; "
                                   "this backbone's attention has none")

    def apply(self, model: nn.Module, num_classes: int) -> None:
        """Add the part's modules to ``model`` (an ImageClassifier), before it moves to the device."""

    def trainable(self, model: nn.Module) -> Optional[list[nn.Parameter]]:
        """The parameters stage 1 trains; None: all of them."""
        return None


def with_classifier(model: nn.Module, params) -> list[nn.Parameter]:
    """``params`` and the classifier's, each once, in the model's order."""
    chosen = {id(p) for p in params} | {id(p) for p in model.classifier.parameters()}
    return [p for p in model.parameters() if id(p) in chosen]


def vit_of(model: nn.Module) -> ViTView:
    """The ViT inside an ImageClassifier (parts that need one are refused elsewhere)."""
    return model.body.vit()
