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
from ltsearch.recipes.finetune.base import FineTune, vit_of, with_classifier
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
        view = vit_of(model)
        bound = math.sqrt(6.0 / (3 * view.patch_pixels + view.dim))
        count = len(view.blocks) if self.params.deep else 1
        model.body.prompts = nn.Parameter(torch.empty(count, self.params.length, view.dim))
        nn.init.uniform_(model.body.prompts, -bound, bound)
        self.added = [model.body.prompts]
        seq = {}
        for i in range(count):
            view.blocks[i].register_forward_pre_hook(_prompted(model.body, i, seq, view.seq_dim))
        view.final_norm.register_forward_pre_hook(_unprompted(seq, view.seq_dim))

    def trainable(self, model):
        return with_classifier(model, self.added)


def _prompted(body: nn.Module, i: int, seq: dict, dim: int):
    def hook(module, args):
        x = args[0]
        if i == 0:
            seq["n"] = x.shape[dim]  # the sequence's own tokens
        prompts = body.prompts[i].to(x.dtype)
        prompts = (prompts.expand(x.shape[0], -1, -1) if dim == 1
                   else prompts[:, None].expand(-1, x.shape[1], -1))
        return (torch.cat([x.narrow(dim, 0, seq["n"]), prompts], dim=dim), *args[1:])
    return hook


def _unprompted(seq: dict, dim: int):
    def hook(module, args):
        return (args[0].narrow(dim, 0, seq["n"]), *args[1:])
    return hook
