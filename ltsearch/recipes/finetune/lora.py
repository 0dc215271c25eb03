"""LoRA (Hu et al., ICLR 2022): a frozen weight W₀ plus a trained low-rank update,
h = W₀x + (α/r)·B A x (Eq. 3; A ∈ R^{r×d} Kaiming-uniform, B ∈ R^{d×r} zero, so ΔW = BA is zero
at the start), on the attention's query and value projections (§7.1, W_q and W_v), as the
official ``loralib`` initialises them. Both timm's ViT (one ``qkv`` Linear) and OpenCLIP's
(``nn.MultiheadAttention``'s ``in_proj_weight``) hold q, k and v as one (3d, d) weight: the
update is a parametrization of it (``torch.nn.utils.parametrize``), W = W₀ + ΔW with ΔW in the
q and v rows, which is the same map as adding (α/r)·BAx to q and v."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ltsearch.config import spec
from ltsearch.recipes.finetune.base import FineTune, vit_of, with_classifier
from ltsearch.recipes.protocol import FINETUNE


@dataclass
class LoRAParams:
    rank: int = spec(8, ge=1, doc="r, the rank of each update")
    alpha: float = spec(8.0, gt=0.0, doc="α: the update is scaled by α/r")


class QVUpdate(nn.Module):
    """W₀ ↦ W₀ + ΔW for a (3d, d) q, k, v weight: (α/r)·B A in the q rows and in the v rows."""

    def __init__(self, dim: int, rank: int, alpha: float):
        super().__init__()
        self.scaling = alpha / rank
        self.a = nn.Parameter(torch.empty(2, rank, dim))
        self.b = nn.Parameter(torch.zeros(2, dim, rank))
        for i in range(2):  # loralib: kaiming_uniform_(A, a=√5), B = 0
            nn.init.kaiming_uniform_(self.a[i], a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        dq, dv = (self.scaling * (self.b[i] @ self.a[i]) for i in range(2))
        return torch.cat([dq, torch.zeros_like(dq), dv])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


@FINETUNE.register
class LoRA(FineTune):
    name = "lora"
    Params = LoRAParams
    needs_blocks = True
    needs_qkv = True

    def apply(self, model, num_classes):
        view = vit_of(model)
        for block in view.blocks:
            module, name = view.qkv(block)
            update = QVUpdate(view.dim, self.params.rank, self.params.alpha)
            parametrize.register_parametrization(module, name, update)
            self.added += list(update.parameters())

    def trainable(self, model):
        return with_classifier(model, self.added)

    @staticmethod
    def update_of(module: nn.Module, name: str) -> tuple[torch.Tensor, QVUpdate]:
        """(W₀, its update) of a parametrized q, k, v weight."""
        p = module.parametrizations[name]
        return p.original, p[0]
