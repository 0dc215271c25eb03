"""Evaluation metrics for long-tailed recognition.

Many / medium / few-shot accuracy follow Liu et al. (OLTR, CVPR 2019): the mean per-class
accuracy over classes with more than ``many`` (100), between ``few`` and ``many`` (20–100), and
fewer than ``few`` (20) training images — the CIFAR- and ImageNet-LT convention. On other data
those thresholds can leave groups empty (every class has more than 100 images), so the groups
can instead be thirds of the classes by training count (``metrics.groups: thirds``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


SCALARS = ("top1", "balanced_acc", "many", "medium", "few")  # reported as val/… and test/…


def shot_groups(counts, many: int = 100, few: int = 20, groups: str = "thresholds") -> dict[str, list[int]]:
    """Class indices per group. ``thirds``: the classes sorted by training count (ties by
    index), the largest third many, the smallest third few (sizes differ by at most one)."""
    if groups == "thirds":
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        k, r = divmod(len(order), 3)
        a = k + (r > 0)
        b = a + k + (r > 1)
        return {"many": sorted(order[:a]), "medium": sorted(order[a:b]), "few": sorted(order[b:])}
    return {
        "many": [c for c, n in enumerate(counts) if n > many],
        "medium": [c for c, n in enumerate(counts) if few <= n <= many],
        "few": [c for c, n in enumerate(counts) if n < few],
    }


def describe_groups(counts, many: int = 100, few: int = 20, groups: str = "thresholds") -> str:
    """Which split many/medium/few use, in words, with the class counts of each."""
    sizes = {g: len(c) for g, c in shot_groups(counts, many, few, groups).items()}
    how = ("thirds of the classes by training count" if groups == "thirds" else
           f"training images > {many} / {few}–{many} / < {few}")
    return f"many/medium/few: {how} ({sizes['many']}/{sizes['medium']}/{sizes['few']} classes)"


def classification_metrics(y: torch.Tensor, pred: torch.Tensor, counts, many: int = 100,
                           few: int = 20, groups: str = "thresholds") -> dict:
    """top1, balanced accuracy (mean per-class recall), shot groups, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted). One device→host copy. (torch is
    imported here: the records, the tracking and the readers of a search folder use the shot
    groups alone, and spare their processes its ~3 s of import.)"""
    import torch

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
    for group, classes in shot_groups(counts, many, few, groups).items():
        vals = [float(per_class[c]) for c in classes if present[c]]
        out[group] = sum(vals) / len(vals) if vals else math.nan
    out["per_class"] = [float(v) for v in per_class]
    out["confusion"] = confusion.tolist()
    return out
