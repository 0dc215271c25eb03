"""Evaluation metrics for long-tailed recognition.

Many / medium / few-shot accuracy follow Liu et al. (OLTR, CVPR 2019): the mean per-class
accuracy over classes with more than ``many`` (100), between ``few`` and ``many`` (20–100), and
fewer than ``few`` (20) training images.
"""
from __future__ import annotations

import math

import torch


SCALARS = ("top1", "balanced_acc", "many", "medium", "few")  # reported as val/… and test/…


def shot_groups(counts, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    return {
        "many": [c for c, n in enumerate(counts) if n > many],
        "medium": [c for c, n in enumerate(counts) if few <= n <= many],
        "few": [c for c, n in enumerate(counts) if n < few],
    }


def classification_metrics(y: torch.Tensor, pred: torch.Tensor, counts, many: int = 100,
                           few: int = 20) -> dict:
    """top1, balanced accuracy (mean per-class recall), shot groups, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted). One device→host copy."""
    C = len(counts)
    confusion = torch.bincount(y * C + pred, minlength=C * C).view(C, C).cpu()
    support = confusion.sum(1).double()
    correct = confusion.diag().double()
    per_class = torch.where(support > 0, correct / support.clamp_min(1), torch.nan)
    present = support > 0
    out = {
        "top1": float(correct.sum() / support.sum()),
        "balanced_acc": float(per_class[present].mean()),
    }
    for group, classes in shot_groups(counts, many, few).items():
        vals = [float(per_class[c]) for c in classes if present[c]]
        out[group] = sum(vals) / len(vals) if vals else math.nan
    out["per_class"] = [float(v) for v in per_class]
    out["confusion"] = confusion.tolist()
    return out
