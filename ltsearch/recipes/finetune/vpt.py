"""Visual prompt tuning (Jia et al., ECCV 2022), placed as LIFT places it (Shi et al., ICML 2024;
``shijxcs/LIFT`` ``models/peft_modules.py``, ``VPT``): ``length`` learned tokens appended to the
sequence before the first block (shallow, Eq. 5) or a fresh set before every block, the previous
block's prompt outputs dropped (deep, Eq. 6); uniform in ±√(6 / (3·p² + d)) for patch size p and
width d (the official Xavier-style init). The prompts are dropped again before the final norm,
so the class token (or the patch-token average) the head reads is pooled as without them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ltsearch.config import spec
from ltsearch.recipes.finetune.base import FineTune, vit_blocks, with_classifier
from ltsearch.recipes.protocol import FINETUNE


@dataclass
class VPTParams:
    length: int = spec(10, ge=1, doc="prompt tokens per layer (LIFT's default 10)")
    deep: bool = spec(False, doc="a new set of prompts before every block (VPT-deep)")


@FINETUNE.register
class VPT(FineTune):
    name = "vpt"
    Params = VPTParams
    needs_blocks = True

    def apply(self, model, num_classes):
        blocks = vit_blocks(model)
        net = model.body.net
        dim = net.embed_dim
        patch = math.prod(net.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch + dim))
        count = len(blocks) if self.params.deep else 1
        model.body.prompts = nn.Parameter(torch.empty(count, self.params.length, dim))
        nn.init.uniform_(model.body.prompts, -bound, bound)
        self.added = [model.body.prompts]
        seq = {}
        for i in range(count):
            blocks[i].register_forward_pre_hook(_prompted(model.body, i, seq))
        net.norm.register_forward_pre_hook(_unprompted(seq))

    def trainable(self, model):
        return with_classifier(model, self.added)


def _prompted(body: nn.Module, i: int, seq: dict):
    def hook(module, args):
        x = args[0]
        if i == 0:
            seq["n"] = x.shape[1]  # the sequence's own tokens
        prompts = body.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x[:, :seq["n"]], prompts], dim=1), *args[1:])
    return hook


def _unprompted(seq: dict):
    def hook(module, args):
        return (args[0][:, :seq["n"]], *args[1:])
    return hook
