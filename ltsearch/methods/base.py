"""The method protocol and its registry (one module per method, found by name, as timm does).

A method supplies what the trainer must not decide by name: the model (``build_model``), the
training phases (``phases``), the index samplers of each epoch (``samplers``), the loss of a step
(``loss``) and hooks between phases (``on_phase_start``). The trainer only runs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltsearch.config import OptimConfig, TrainConfig
from ltsearch.data.device import DeviceImages
from ltsearch.data.samplers import ClassIndex, Sampler, make_sampler
from ltsearch.models import ImageClassifier

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(method_names())})") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


@dataclass
class Phase:
    """A span of epochs with its own optimiser and schedule.

    ``classifier_only`` freezes everything but ``model.classifier`` (BatchNorm statistics too);
    ``reset_classifier`` re-initialises the classifier at the phase start (cRT, Kang et al. 2020).
    """
    name: str
    optim: OptimConfig
    classifier_only: bool = False
    reset_classifier: bool = False


def classifier_phase(name: str, epochs: int, lr: float, train: TrainConfig,
                     reset: bool = False) -> Phase:
    """A classifier-only phase on frozen features: same batch and momentum, cosine lr to 0."""
    optim = OptimConfig(epochs=epochs, batch_size=train.batch_size, lr=lr, momentum=train.momentum,
                        weight_decay=train.weight_decay, warmup_epochs=0, schedule="cosine",
                        milestones=[])
    return Phase(name, optim, classifier_only=True, reset_classifier=reset)


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class MethodContext:
    """What a method may read: class counts, the device-resident training set and its index."""
    counts: list[int]
    train: DeviceImages
    index: ClassIndex
    device: torch.device
    generator: torch.Generator | None = None  # the trainer's, re-seeded every epoch

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def counts_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.counts, dtype=torch.float32, device=self.device)


@dataclass
class NoParams:
    pass


class Method:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any, ctx: MethodContext, train: TrainConfig):
        self.params = params
        self.ctx = ctx
        self.train_cfg = train
        self.model: nn.Module | None = None

    @classmethod
    def check_config(cls, params: Any, train: TrainConfig) -> None:
        """Rules that tie the method's parameters to the rest of the config; raise
        ``ConfigError`` with the parameter's name as key."""

    @classmethod
    def extra_epochs(cls, params: Any) -> int:
        """Epochs the method adds after ``train.epochs`` (a second phase), for ASHA's max_t."""
        return 0

    # --- model and phases --------------------------------------------------------------------
    def build_model(self, body: nn.Sequential, feat_dim: int) -> nn.Module:
        self.model = ImageClassifier(body, feat_dim, self.ctx.num_classes)
        return self.model

    def phases(self) -> list[Phase]:
        return [Phase("train", self.train_cfg)]

    def on_phase_start(self, phase: Phase, phase_index: int, resumed: bool) -> None:
        """Called before the first epoch of each phase, and with ``resumed=True`` when a run
        restarts from a checkpoint inside it (the method's ``state_dict`` is loaded by then)."""

    # --- one epoch ---------------------------------------------------------------------------
    def samplers(self, phase: Phase, epoch: int) -> list[Sampler]:
        """Index streams for ``epoch`` (0-based, within ``phase``); one batch per stream per step."""
        return [self.sampler("instance")]

    def start_epoch(self, phase: Phase, epoch: int, steps: int, rng: np.random.Generator) -> None:
        """Draw per-epoch randomness up front (``rng`` is seeded by run seed and epoch)."""

    def loss(self, model: Callable, batches: list[Batch], phase: Phase, epoch: int,
             step: int) -> torch.Tensor:
        """Loss of one step; ``model`` is the (possibly compiled) forward of ``self.model``."""
        b = batches[0]
        return F.cross_entropy(model(b.x), b.y)

    def epoch_metrics(self, phase: Phase, epoch: int) -> dict[str, float]:
        """Extra per-epoch values worth recording (e.g. BBN's α)."""
        return {}

    # --- state kept across checkpoint/resume --------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # --- helpers -----------------------------------------------------------------------------
    def sampler(self, name: str) -> Sampler:
        return make_sampler(name, self.ctx.index)
