"""Any timm model as a body: its features without its classifier, weights from a local file.

timm builds and loads (``create_model(name, pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file=PATH))``: its own conversions, such as a ViT's position
embedding resampled to another input size, apply); :func:`ltsearch.models.weights.check_fit`
first makes sure the file is the model's, since timm loads without strictness once it has dropped
the classifier. The input size, interpolation, mean and std come from the model's pretrained
config (``options.img_size``, where given, is the size the model is built for).
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ltsearch.config import ConfigError
from ltsearch.models.interface import Preprocess, ViTView


class TimmBody(nn.Module):
    """``forward``: the model's ``forward_features`` (a conv map (N, C, H, W) or tokens
    (N, L, C)); ``pool``: its own pooling up to the classifier (``forward_head(pre_logits=True)``:
    average pooling of a CNN, a ViT's class token or token average)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=True)

    def preprocess(self, options: dict) -> Preprocess:
        return preprocess_of(self.net, options)

    def vit(self) -> Optional[ViTView]:
        """A timm ViT's blocks (each with ``attn.qkv``, ``norm2`` and ``mlp``), else None."""
        net = self.net
        blocks = getattr(net, "blocks", None)
        if not (isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(net, "patch_embed")
                and all(hasattr(b, "mlp") and hasattr(b, "norm2") for b in blocks)):
            return None
        has_qkv = all(isinstance(getattr(b.attn, "qkv", None), nn.Linear) for b in blocks)
        return ViTView(list(blocks), net.embed_dim, math.prod(net.patch_embed.patch_size), net.norm,
                       norm2=lambda b: b.norm2, mlp=lambda b: b.mlp,
                       qkv=(lambda b: (b.attn.qkv, "weight")) if has_qkv else None)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The parameters by depth, stem first (timm's own ``group_matcher``), for layer-wise
        learning-rate decay and partial fine-tuning."""
        from timm.models import group_parameters

        named = dict(self.net.named_parameters())
        groups = group_parameters(self.net, self.net.group_matcher(coarse=False))
        return [[named[n] for n in groups[k]] for k in sorted(groups)]


def check_name(name: str, key: str = "model.arch") -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(key, f"timm knows no model {name!r}{hint}")


def build_net(name: str, options: dict, weights: Optional[Path], in_chans: int = 3) -> nn.Module:
    """The timm model without classifier, from ``weights`` when given (never a download)."""
    import timm

    kwargs = dict(options, num_classes=0, in_chans=in_chans)
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                             **kwargs)


def preprocess_of(net: nn.Module, options: dict) -> Preprocess:
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(net)
    size = options.get("img_size", data["input_size"][1:])
    size = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(size=size, interpolation=data.get("interpolation", "bilinear"),
                      mean=tuple(data["mean"]), std=tuple(data["std"]), channels=3)


def classifier_keys(net: nn.Module) -> set[str]:
    """The pretrained classifier's tensor names (dropped on loading: the classifier is new)."""
    heads = net.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
