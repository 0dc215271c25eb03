"""LoRA (Hu et al., ICLR 2022): a frozen weight W₀ plus a trained low-rank update,
h = W₀x + (α/r)·B A x (Eq. 3; A ∈ R^{r×d} Kaiming-uniform, B ∈ R^{d×r} zero, so ΔW = BA is zero
at the start), on the attention's query and value projections (§7.1, W_q and W_v), as the
official ``loralib`` initialises them. timm's ViT computes q, k and v in one ``qkv`` layer: the
update goes to its q and v rows, which is the same map (:meth:`LoRA.merged_qkv` folds it in)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ltsearch.config import spec
from ltsearch.recipes.finetune.base import FineTune, vit_of, with_classifier
from ltsearch.recipes.protocol import FINETUNE


@dataclass
class LoRAParams:
    rank: int = spec(8, ge=1, doc="r, the rank of each update")
    alpha: float = spec(8.0, gt=0.0, doc="α: the update is scaled by α/r")


class QVUpdate(nn.Module):
    """(α/r)·B A x for q and for v, laid out as qkv's output (k's third untouched)."""

    def __init__(self, dim: int, rank: int, alpha: float):
        super().__init__()
        self.scaling = alpha / rank
        self.a = nn.Parameter(torch.empty(2, rank, dim))
        self.b = nn.Parameter(torch.zeros(2, dim, rank))
        for i in range(2):  # loralib: kaiming_uniform_(A, a=√5), B = 0
            nn.init.kaiming_uniform_(self.a[i], a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """ΔW for qkv's (3d, d) weight: the q rows, zeros for k, the v rows."""
        dq, dv = (self.scaling * (self.b[i] @ self.a[i]) for i in range(2))
        return torch.cat([dq, torch.zeros_like(dq), dv])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dq, dv = (self.scaling * (x @ self.a[i].T @ self.b[i].T) for i in range(2))
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


@FINETUNE.register
class LoRA(FineTune):
    name = "lora"
    Params = LoRAParams
    needs_blocks = True
    needs_qkv = True

    def apply(self, model, num_classes):
        view = vit_of(model)
        for block in view.blocks:
            qkv = view.qkv(block)
            qkv.lora = QVUpdate(qkv.in_features, self.params.rank, self.params.alpha)
            qkv.register_forward_hook(_add_update(qkv.lora))
            self.added += list(qkv.lora.parameters())

    def trainable(self, model):
        return with_classifier(model, self.added)

    @staticmethod
    def merged_qkv(qkv: nn.Linear) -> torch.Tensor:
        """W₀ + ΔW of a qkv layer: the weight a merged model would hold."""
        return qkv.weight + qkv.lora.delta()


def _add_update(update: QVUpdate):
    def hook(module, args, output):
        return output + update(args[0])
    return hook
