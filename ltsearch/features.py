"""Frozen features, computed once: a phase that trains only the classifier on a body that does
not change (frozen weights, frozen normalisation statistics, eval mode) and sees the images as
they are (no augmentation, no mixup) gets the same features every epoch. The trainer computes
them once and the phase's steps and evaluations run the classifier alone on them
(:class:`FeatureBody` stands in for the body), which is what makes a search over the
long-tail head recipes on a pretrained backbone nearly free. A linear probe's first phase reads
the pretrained body itself: its features are kept per process (a Ray worker's next trial on the
same backbone and data computes nothing); a later phase's body is the trial's own.
With augmentation on, the features differ every epoch and nothing is cached.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Hashable

import torch
import torch.nn as nn

KEEP = 2  # feature sets kept per process (each: train, val and test features on the device)
_KEPT: "OrderedDict[Hashable, dict]" = OrderedDict()


class FeatureBody(nn.Module):
    """The identity where the body was: the model's ``embed`` and ``forward`` then read features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features


class DeviceFeatures:
    """Stored features with the images' labels, batched as :class:`DeviceImages` are (never
    augmented: the cache is only used where nothing would be)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def steps(self, order: torch.Tensor, batch_size: int):
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size], None

    def batch(self, idx: torch.Tensor, gen=None, augment: bool = True, view=None, raw=None):
        return self.x[idx], self.y[idx]  # (a view's features are a set of their own)


@torch.no_grad()
def embed_all(model: nn.Module, images, batch_size: int, autocast, view=None) -> DeviceFeatures:
    """``model.embed`` of every image (``view``: one test-time view of it), unaugmented, in eval
    mode, as float32."""
    was = model.training
    model.eval()
    out = []
    for idx, raw in images.steps(torch.arange(len(images), device=images.y.device), batch_size):
        x, _ = images.batch(idx, augment=False, view=view, raw=raw)
        with autocast():
            out.append(model.embed(x).float())
    model.train(was)
    return DeviceFeatures(torch.cat(out), images.y)


def features(key: Hashable, compute: Callable[[], dict], keep: bool) -> dict:
    """The feature sets under ``key``: computed once; kept for the process's later trials where
    ``keep`` (the pretrained body's), else for the phase alone."""
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key]
    sets = compute()
    if keep:
        _KEPT[key] = sets
        while len(_KEPT) > KEEP:
            _KEPT.popitem(last=False)
    return sets


@contextlib.contextmanager
def on_features(model: nn.Module):
    """The model with its body swapped out for :class:`FeatureBody` (put back after, so that
    checkpoints and later phases see the real body)."""
    body = model.body
    model.body = FeatureBody()
    try:
        yield model
    finally:
        model.body = body
