"""What the trainer asks of a recipe (Lightning's split: the recipe supplies hooks, the trainer
owns the loop), and the registry that finds parts by name (timm's shape: one part per module).

A recipe supplies what the trainer must not decide by name: the model (``build_model``), the
training phases (``phases``), the index streams of each epoch (``samplers``), the loss of a step
(``loss``), inference logits (``logits``), and hooks between phases and steps.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn as nn

from ltsearch.config import ConfigError, OptimConfig, TrainConfig, from_dict
from ltsearch.data.device import DeviceImages
from ltsearch.data.samplers import ClassIndex, Draw


@dataclass
class Phase:
    """A span of epochs with its own optimiser and schedule.

    ``classifier_only`` trains only ``model.classifier`` (or ``params()`` when given) on frozen
    features; their BatchNorm statistics stay frozen unless ``update_bn`` (cRT's official code
    keeps the network in train mode, so they follow the re-balanced batches).
    """
    name: str
    optim: OptimConfig
    classifier_only: bool = False
    update_bn: bool = False
    params: Optional[Callable[[], Optional[list]]] = None  # None, or returning None: as above


def classifier_phase(name: str, epochs: int, lr: float, train: TrainConfig,
                     weight_decay: Optional[float] = None, update_bn: bool = False) -> Phase:
    """A classifier-only phase on frozen features: same batch and momentum, cosine lr to 0."""
    optim = OptimConfig(epochs=epochs, batch_size=train.batch_size, lr=lr, momentum=train.momentum,
                        weight_decay=train.weight_decay if weight_decay is None else weight_decay,
                        warmup_epochs=0, schedule="cosine", milestones=[])
    return Phase(name, optim, classifier_only=True, update_bn=update_bn)


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class MethodContext:
    """What a recipe may read: class counts, the device-resident training set and its index."""
    counts: list[int]
    train: DeviceImages
    index: ClassIndex
    device: torch.device
    generator: torch.Generator | None = None  # the trainer's, re-seeded every epoch
    classes: list[str] | None = None  # the class names (a head initialised from text reads them)
    initialise: bool = True  # False: saved weights are loaded next; no init from text or data

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def counts_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.counts, dtype=torch.float32, device=self.device)


class Method:
    """The hooks the trainer calls; :class:`ltsearch.recipes.recipe.Recipe` implements them."""

    def build_model(self, build_body: Callable[[], tuple[nn.Sequential, int]]) -> nn.Module:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def on_phase_start(self, phase: Phase, phase_index: int, resumed: bool) -> None:
        """Called before the first epoch of each phase (after its optimiser exists), and with
        ``resumed=True`` when a run restarts inside it (``load_state_dict`` ran by then)."""

    def no_decay(self, phase: Phase) -> set:
        """Parameters exempt from weight decay in ``phase``."""
        return set()

    def features_cacheable(self, phase: Phase) -> bool:
        """Whether ``phase``'s steps and evaluations read the body only through ``model.embed``
        / ``model(x)`` of unmixed images (then a frozen body's features can be computed once)."""
        return False

    def lr_scales(self, phase: Phase) -> dict:
        """Per-parameter factors of the phase's learning rate (absent: 1)."""
        return {}

    def samplers(self, phase: Phase, epoch: int) -> list[Draw]:
        """Index streams for ``epoch`` (0-based, within ``phase``); one batch per stream per step."""
        raise NotImplementedError

    def start_epoch(self, phase: Phase, epoch: int, steps: int, rng: np.random.Generator) -> None:
        """Draw per-epoch randomness up front (``rng`` is seeded by run seed and epoch)."""

    def loss(self, model: Callable, batches: list[Batch], phase: Phase, epoch: int,
             step: int) -> torch.Tensor:
        """Loss of one step; ``model`` is the (possibly compiled) forward of the model."""
        raise NotImplementedError

    def after_step(self, phase: Phase) -> None:
        """After each optimiser step (e.g. a projection of the weights)."""

    def end_epoch(self, phase: Phase) -> None:
        """After the last step of each epoch, before it is evaluated."""

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Inference logits (post-hoc adjustments apply here)."""
        return model(x)

    def epoch_metrics(self, phase: Phase, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Parts and their registries


@dataclass
class NoParams:
    pass


class Part:
    """A registered piece of a recipe: ``name`` and a ``Params`` dataclass of its parameters
    (types, defaults and ranges, checked by :func:`ltsearch.config.from_dict`)."""
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    metrics: ClassVar[tuple[str, ...]] = ()  # extra per-epoch values it reports

    def inference(self) -> dict:
        """What the part does to a trained model's predictions, for its saved description
        (:mod:`ltsearch.inference`); the predictions themselves run the part's own code."""
        return {}


@dataclass
class PartConfig:
    """A chosen part and its parameters."""
    name: str
    params: Any

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.params)}


class Registry:
    """Parts of one kind found by name; adding one is one module that calls ``register``."""

    def __init__(self, kind: str):
        self.kind = kind
        self.parts: dict[str, type[Part]] = {}

    def register(self, cls: type[Part]) -> type[Part]:
        if cls.name in self.parts:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
        self.parts[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self.parts)

    def get(self, name: str) -> type[Part]:
        return self.parts[name]

    def parse(self, data: Any, key: str) -> PartConfig:
        """``{name: …, <params>}`` (or just the name) → a checked :class:`PartConfig`."""
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            raise ConfigError(key, f"must be a mapping with a name, got {data!r}")
        data = dict(data)
        name = data.pop("name", None)
        if name not in self.parts:
            raise ConfigError(f"{key}.name", f"unknown {self.kind} {name!r} "
                                             f"(known: {', '.join(self.names())})")
        cls = self.parts[name]
        try:
            params = from_dict(cls.Params, data, key)
        except ConfigError as e:
            if e.message.startswith("unknown key"):
                known = ", ".join(f.name for f in dataclasses.fields(cls.Params)) or "none"
                raise ConfigError(e.key, f"not a parameter of {self.kind} {name!r} "
                                         f"(its parameters: {known})") from None
            raise
        return PartConfig(name, params)


LOSSES = Registry("loss")
ARCHS = Registry("arch")
STAGE2 = Registry("stage2")
FINETUNE = Registry("finetune")


def import_parts(package: str, path) -> None:
    """Import every module of a parts folder, so each registers itself (one file per part)."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
