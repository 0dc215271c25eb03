"""AdaptFormer (Chen et al., NeurIPS 2022), as LIFT uses it (Shi et al., ICML 2024;
``shijxcs/LIFT`` ``models/peft_modules.py``): beside each block's MLP a bottleneck
x̃ = s·up(ReLU(down(LN(x')))) on the MLP's input x' (before the block's own norm) is added to the
MLP's output: x = x' + MLP(LN(x')) + x̃ (Eq. 1–2). down is Kaiming-normal, up and both biases
zero, so a new adapter leaves the network's output unchanged. ``scale`` null: s is learned,
starting at 1 (LIFT); a number: fixed (AdaptFormer's 0.1). The bottleneck defaults to LIFT's
2^max(0, ⌊log₂(C / 2L)⌋) for C classes and L blocks. Deviation: where a timm block scales or
drops its MLP branch (LayerScale, drop-path), the adapter's output is scaled and dropped with it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ltsearch.config import spec
from ltsearch.recipes.finetune.base import FineTune, vit_of, with_classifier
from ltsearch.recipes.protocol import FINETUNE


@dataclass
class AdaptFormerParams:
    bottleneck: Optional[int] = spec(None, ge=1, doc="the adapter's width; default LIFT's "
                                     "2^max(0, floor(log2(classes / (2 · blocks))))")
    scale: Optional[float] = spec(None, gt=0.0, doc="s; null: learned, from 1 (LIFT)")
    layer_norm: bool = spec(True, doc="LIFT's LayerNorm on the adapter's input")


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, scale: Optional[float], layer_norm: bool):
        super().__init__()
        self.ln = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)
        if scale is None:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.tensor([scale]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(self.ln(x)))) * self.scale


def default_bottleneck(num_classes: int, blocks: int) -> int:
    return 2 ** max(0, int(math.log2(num_classes / (blocks * 2))))


@FINETUNE.register
class AdaptFormer(FineTune):
    name = "adaptformer"
    Params = AdaptFormerParams
    needs_blocks = True

    def apply(self, model, num_classes):
        view = vit_of(model)
        p = self.params
        width = p.bottleneck or default_bottleneck(num_classes, len(view.blocks))
        for block in view.blocks:
            block.adaptformer = Adapter(view.dim, width, p.scale, p.layer_norm)
            seen = {}
            view.norm2(block).register_forward_pre_hook(_keep_input(seen))
            view.mlp(block).register_forward_hook(_add_adapter(block.adaptformer, seen))
            self.added += list(block.adaptformer.parameters())

    def trainable(self, model):
        return with_classifier(model, self.added)


def _keep_input(seen: dict):
    def hook(module, args):
        seen["x"] = args[0]
    return hook


def _add_adapter(adapter: Adapter, seen: dict):
    def hook(module, args, output):
        return output + adapter(seen.pop("x"))
    return hook
