"""The trainer: pure PyTorch, no Ray, Optuna or MLflow (the search wraps it).

Read top to bottom: data goes to the device once as uint8; each epoch the method's samplers draw
all indices at once, batches are gathered and augmented on the device, the method computes the
loss, SGD steps. Validation runs every ``eval_every`` epochs, test at the end; each evaluated
epoch's metrics go to a callback. Images and weights are channels_last on every device (oneDNN's
CPU convolutions run ResNet-32 15–25 % faster so, measured on 8×8 and 32×32 inputs). On CUDA:
bf16 autocast, fused SGD and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs, static
shapes via drop-last batches). On the CPU: :mod:`ltsearch.optim`'s SGD, the same arithmetic
without torch.optim's import of torch._dynamo.

Randomness is derived from (seed, epoch), so a run resumed from a checkpoint draws the same
indices, augmentations and per-step values as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ltsearch import features as frozen
from ltsearch.config import Config
from ltsearch.data import LongTailData
from ltsearch.data.device import DeviceImages, channel_stats, tta_views
from ltsearch.data.stream import images_on
from ltsearch.data.samplers import ClassIndex
from ltsearch.inference import autocast, eval_batch_size, mean_logits, resolve_device
from ltsearch.recipes import Batch, MethodContext, Phase, Recipe
from ltsearch.metrics import classification_metrics
from ltsearch.models import build_body, preprocess
from ltsearch.optim import SGD

log = logging.getLogger(__name__)


def compile_forward(model: torch.nn.Module) -> Callable:
    """CUDA graphs over inductor. Dynamo keeps its graphs with the forward's code, not with the
    model object, and our forwards take their per-step values as tensors (BBN's α), so a reused
    worker's next trial, a fresh model of the same architecture, compiles nothing again: the
    compile is paid once per worker process (tests/test_trainer.py counts the graphs)."""
    return torch.compile(model, mode="reduce-overhead")


@dataclass
class TrainResult:
    status: str  # "finished", "diverged" or "stopped" (max_epochs reached before the end)
    epochs: int  # completed epochs
    metrics: dict  # the last report: val/…, and test/… when finished
    history: list[dict] = field(default_factory=list)  # scalar metrics per evaluated epoch
    error: Optional[str] = None


class Trainer:
    def __init__(self, cfg: Config, data: LongTailData, device: torch.device | str | None = None):
        self.cfg = cfg
        self.data = data
        self.device = resolve_device(device or cfg.train.device) if not isinstance(device, torch.device) else device
        self.cuda = self.device.type == "cuda"
        self.compiling = self.cuda and cfg.train.compile  # CPU: inductor takes ~35 s on ResNet-32
        if not self.cuda:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)

        # A pretrained backbone's input: its size (resized on the device), mean and std; a
        # network from scratch: the data's size and statistics.
        pre = preprocess(cfg.model)
        mean, std = ((torch.tensor(pre.mean), torch.tensor(pre.std)) if pre.mean is not None
                     else channel_stats(data.train))
        aug = cfg.data.augment
        shape = dict(size=pre.size, interpolation=pre.interpolation, channels=pre.channels,
                     eval_crop_pct=aug.eval_crop_pct)
        rrc = (tuple(aug.scale), tuple(aug.ratio)) if aug.random_resized_crop else None
        self.train_set = images_on(data.train, self.device, mean, std, aug.crop_pad, aug.hflip,
                                   rrc=rrc, **shape)
        self.val_set = images_on(data.val, self.device, mean, std, **shape)
        self.test_set = (self.val_set if data.val is data.test else
                         images_on(data.test, self.device, mean, std, **shape))

        ctx = MethodContext(data.counts, self.train_set, ClassIndex(self.train_set.y, data.num_classes),
                            self.device, classes=list(data.classes))
        self.method = Recipe(cfg.method, ctx, cfg.train)
        self.model = self.method.build_model(
            lambda: build_body(cfg.model, data.in_channels)).to(
                self.device, memory_format=torch.channels_last)
        self.phases = self.method.phases()
        self.total_epochs = sum(p.optim.epochs for p in self.phases)
        self.epoch = 0  # completed epochs
        self.history: list[dict] = []
        self.phase_results: dict = {}  # test metrics at the end of each earlier phase
        self.optimizer: torch.optim.Optimizer | SGD | None = None
        self._phase_index: int | None = None
        self._compiled = None
        self._compile_verified = False
        self.eval_seconds = 0.0  # spent evaluating, all told (reported per epoch as eval_time_s)
        self._features: dict | None = None  # the phase's frozen features (ltsearch.features)

    # --- phases ------------------------------------------------------------------------------
    def locate(self, epoch: int) -> tuple[int, int]:
        """(phase index, epoch within phase) of global 0-based ``epoch``."""
        for i, phase in enumerate(self.phases):
            if epoch < phase.optim.epochs:
                return i, epoch
            epoch -= phase.optim.epochs
        raise IndexError(epoch)

    def _enter_phase(self, index: int, resumed: bool) -> None:
        phase = self.phases[index]
        params = phase.params() if phase.params is not None else None
        if params is None:
            module = self.model.classifier if phase.classifier_only else self.model
            params = list(module.parameters())
        trainable = set(params)
        for p in self.model.parameters():
            p.requires_grad_(p in trainable)
        o = phase.optim
        exempt = self.method.no_decay(phase)
        scales = self.method.lr_scales(phase)
        by_kind: dict[tuple[bool, float], list] = {}  # (exempt from decay, lr factor) → params
        for p in params:
            by_kind.setdefault((p in exempt, scales.get(p, 1.0)), []).append(p)
        groups = [{"params": ps, "lr_scale": scale, **({"weight_decay": 0.0} if free else {})}
                  for (free, scale), ps in by_kind.items()]
        hyper = dict(lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        # CUDA: one fused kernel for all parameters. CPU: the same arithmetic without
        # torch.optim, whose first use imports torch._dynamo (seconds per process).
        self.optimizer = (torch.optim.SGD(groups, fused=True, **hyper) if self.cuda
                          else SGD(groups, **hyper))
        self._phase_index = index
        self.method.on_phase_start(phase, index, resumed)
        self._features = self._frozen_features(phase, index)

    def _frozen_features(self, phase: Phase, index: int) -> dict | None:
        """The phase's train/val/test features where its body cannot change and its images are
        seen as they are (:mod:`ltsearch.features`), else None. The first phase's body is the
        one built (pretrained): its features are kept for this process's later trials."""
        if (not phase.classifier_only or phase.update_bn or self.train_set.augments
                or not self.cfg.train.feature_cache
                or not self.method.features_cacheable(phase)):
            return None
        d = self.cfg.to_dict()
        seed = None if self.cfg.model.weights else self.cfg.seed  # (a random body is the seed's)
        key = ((repr(d["model"]), repr(d["data"]), seed, repr(self._views()), str(self.device))
               if index == 0 else (id(self), index))
        bs = self._eval_batch

        def compute() -> dict:  # the training images; each evaluation view of val and test
            out = {"train": frozen.embed_all(self.model, self.train_set, bs, self._autocast)}
            for name, images in (("val", self.val_set), ("test", self.test_set)):
                for v, view in enumerate(self._views()):
                    out[f"{name}@{v}"] = frozen.embed_all(self.model, images, bs, self._autocast, view)
            return out

        return frozen.features(key, compute, keep=index == 0)

    @property
    def _eval_batch(self) -> int:
        return eval_batch_size(self.cfg.train, self.cuda)

    def _autocast(self):
        return autocast(self.cfg.train, self.cuda)

    def _views(self) -> list:
        return tta_views(self.cfg.train.tta, self.cfg.train.tta_expand)

    def _on(self, name: str, images):
        """(what a step or an evaluation reads, the model's state it runs in): the phase's frozen
        features ``name`` and the model on them, or the images and the model itself."""
        if self._features is None:
            return images, contextlib.nullcontext(self.model)
        return self._features[name], frozen.on_features(self.model)

    def _train_mode(self, phase: Phase) -> None:
        self.model.train()
        if phase.classifier_only and not phase.update_bn:  # frozen BatchNorm statistics too
            for name, child in self.model.named_children():
                if name != "classifier":
                    child.eval()

    def _forward_fn(self, phase: Phase) -> Callable:
        if not self.compiling or phase.classifier_only:
            return self.model
        if self._compiled is None:
            self._compiled = compile_forward(self.model)
        return self._compiled

    # --- one epoch ---------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        index, e = self.locate(self.epoch)
        if self._phase_index != index:
            self._enter_phase(index, resumed=False)
        phase = self.phases[index]
        lr = phase.optim.lr_at(e)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self._train_mode(phase)

        n = len(self.train_set)
        B = min(phase.optim.batch_size, n)
        steps = n // B
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        rng = np.random.default_rng([self.cfg.seed, self.epoch])
        self.method.ctx.generator = gen
        streams = [draw(steps * B, gen) for draw in self.method.samplers(phase, e)]
        self.method.start_epoch(phase, e, steps, rng)
        forward = self._forward_fn(phase)
        autocast = self._autocast()
        train_set, on = self._on("train", self.train_set)

        loss_sum = torch.zeros((), device=self.device)
        start = time.perf_counter()
        with on:
            for k, step in enumerate(zip(*(train_set.steps(s, B) for s in streams))):
                batches = [Batch(*train_set.batch(idx, gen, raw=raw)) for idx, raw in step]
                if forward is not self.model:
                    torch.compiler.cudagraph_mark_step_begin()
                try:
                    with autocast:
                        loss = self.method.loss(forward, batches, phase, e, k)
                except Exception as exc:  # a compiler failure must not cost the run: fall back once
                    if forward is self.model or self._compile_verified:
                        raise
                    log.warning("torch.compile failed (%s: %s); continuing eagerly", type(exc).__name__, exc)
                    self._compiled, forward = self.model, self.model
                    with autocast:
                        loss = self.method.loss(forward, batches, phase, e, k)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.method.after_step(phase)
                self._compile_verified = True
                loss_sum += loss.detach().float()
        self.method.end_epoch(phase)
        mean_loss = float(loss_sum) / steps  # one device→host sync per epoch
        elapsed = time.perf_counter() - start
        self.epoch += 1
        return {"epoch": self.epoch, "phase": phase.name, "train/loss": mean_loss, "lr": lr,
                "images_per_s": steps * B * len(streams) / elapsed, "epoch_time_s": elapsed,
                **self.method.epoch_metrics(phase, e)}

    # --- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, images: DeviceImages) -> torch.Tensor:
        """(N, K) logits of the evaluation: the mean over its test-time views (what a saved
        model, :mod:`ltsearch.inference`, gives too)."""
        self.model.eval()
        name = "test" if images is self.test_set and images is not self.val_set else "val"
        views = self._views()
        reader = self._on(f"{name}@0", images)[0]  # the images (each batch read once), or features

        def view_logits(idx, raw, v):
            source, on = self._on(f"{name}@{v}", images)
            with on, self._autocast():
                x, _ = source.batch(idx, augment=False, view=views[v], raw=raw)
                return self.method.logits(self.model, x).float()

        order = torch.arange(len(images), device=self.device)
        return mean_logits(reader.steps(order, self._eval_batch), view_logits, len(views))

    def predict(self, images: DeviceImages) -> torch.Tensor:
        return self.logits(images).argmax(1)

    def evaluate(self, images: DeviceImages, prefix: str) -> dict:
        start = time.perf_counter()
        m = self.cfg.train.metrics
        metrics = classification_metrics(images.y, self.predict(images), self.data.counts,
                                         m.many_threshold, m.few_threshold, m.groups)
        self.eval_seconds += time.perf_counter() - start
        return {f"{prefix}/{k}": v for k, v in metrics.items()}

    # --- the run -----------------------------------------------------------------------------
    def fit(self, callback: Callable[[dict, "Trainer"], None] | None = None,
            max_epochs: int | None = None, time_limit_s: float | None = None) -> TrainResult:
        """Train from ``self.epoch`` to the end (or ``max_epochs`` total); report every
        evaluated epoch to ``callback(metrics, trainer)``. When a phase ends before the last one,
        its test metrics are kept as ``<phase>/test/…`` (e.g. stage-1 accuracy before cRT)."""
        stop_at = self.total_epochs if max_epochs is None else min(max_epochs, self.total_epochs)
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        metrics: dict = {}
        while self.epoch < stop_at:
            evaluated = self.eval_seconds
            if deadline is not None and time.monotonic() > deadline:
                log.warning("time limit reached after %d epochs; evaluating on test", self.epoch)
                metrics.update(self.evaluate(self.test_set, "test"))
                break
            metrics = self.train_epoch()
            metrics.update(self.phase_results)
            index, _ = self.locate(self.epoch - 1)
            if self.epoch < self.total_epochs and self.locate(self.epoch)[0] != index:
                name = self.phases[index].name
                self.phase_results.update({f"{name}/{k}": v for k, v in self.evaluate(
                    self.test_set, "test").items() if not isinstance(v, list)})
                metrics.update(self.phase_results)
            if not math.isfinite(metrics["train/loss"]):
                error = (f"non-finite training loss ({metrics['train/loss']}) in epoch "
                         f"{metrics['epoch']} at lr {metrics['lr']:g}; the run was stopped")
                log.error(error)
                return TrainResult("diverged", self.epoch, metrics, self.history, error)
            last = self.epoch == self.total_epochs
            if last or self.epoch % self.cfg.train.eval_every == 0:
                if last:
                    test = self.evaluate(self.test_set, "test")
                    metrics.update(test)
                if last and self.data.val is self.data.test:  # no split: don't evaluate twice
                    metrics.update({"val/" + k[5:]: v for k, v in test.items()})
                else:
                    metrics.update(self.evaluate(self.val_set, "val"))
                metrics["total_epochs"] = self.total_epochs
                metrics["eval_time_s"] = self.eval_seconds - evaluated
                self.history.append({k: v for k, v in metrics.items() if not isinstance(v, list)})
                if callback is not None:
                    callback(metrics, self)
        status = "finished" if self.epoch == self.total_epochs else "stopped"
        return TrainResult(status, self.epoch, metrics, self.history)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "phase_index": self._phase_index,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "method": self.method.state_dict(), "history": self.history,
                "phase_results": self.phase_results}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.phase_results = dict(state["phase_results"])
        self._phase_index = None
        self._features = None
        if state["phase_index"] is not None and self.epoch < self.total_epochs:
            index, e = self.locate(self.epoch)
            if index == state["phase_index"]:  # resume inside the phase the optimizer belongs to
                self._enter_phase(index, resumed=True)
                self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
