"""A recipe: the parts of a trial, composed (loss × class weights × sampler × mixup × architecture
× fine-tuning × second stage × post-hoc adjustment), and the one :class:`Method` the trainer runs.

``method:`` in a config names a preset (:mod:`ltsearch.recipes.presets`) and may override any
part; :func:`load_recipe` expands it into a :class:`RecipeConfig` and :func:`check_recipe` rejects
every combination that cannot work, naming the key, before anything trains.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.nn as nn

from ltsearch.config import (ConfigError, EpochAt, TrainConfig, check_epoch_at, from_dict,
                             resolve_epoch, scale_epoch, type_hints)
from ltsearch.recipes.losses.logit_adjust import log_priors
from ltsearch.recipes.arch.plain import head_of
from ltsearch.recipes.mixup import Mixer, MixupConfig
from ltsearch.recipes.posthoc import PosthocConfig, adjust_logits
from ltsearch.recipes.presets import PRESETS
from ltsearch.recipes.protocol import ARCHS, FINETUNE, LOSSES, STAGE2, Method, PartConfig, Phase
from ltsearch.recipes.sampling import SamplerConfig, scheduled_sampler
from ltsearch.recipes.weights import WeightsConfig, class_weights, objective

# The kinds of part a method config may set, and what each is without a preset's say.
DEFAULT_PARTS: dict[str, Any] = {"loss": {"name": "ce"}, "weights": None,
                                 "sampler": {"name": "instance"}, "mixup": None,
                                 "arch": {"name": "plain"}, "finetune": {"name": "full"},
                                 "stage2": None, "posthoc": None}
REGISTRIES = {"loss": LOSSES, "arch": ARCHS, "finetune": FINETUNE, "stage2": STAGE2}
SECTIONS = {"weights": WeightsConfig, "sampler": SamplerConfig, "mixup": MixupConfig,
            "posthoc": PosthocConfig}
METHOD_KEYS = ("name", *DEFAULT_PARTS, "train")


@dataclass
class RecipeConfig:
    name: str  # the preset
    loss: PartConfig
    arch: PartConfig
    sampler: SamplerConfig
    weights: Optional[WeightsConfig] = None
    mixup: Optional[MixupConfig] = None
    finetune: Optional[PartConfig] = None
    stage2: Optional[PartConfig] = None
    posthoc: Optional[PosthocConfig] = None
    train: dict = field(default_factory=dict)       # method.train: overrides of the train section
    train_fill: dict = field(default_factory=dict)  # the preset's recipe (its name brings it back)

    def parts(self) -> dict[str, Any]:
        return {kind: getattr(self, kind) for kind in DEFAULT_PARTS}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        for kind, part in self.parts().items():
            if part is None:
                out[kind] = None
            elif isinstance(part, PartConfig):
                out[kind] = part.to_dict()
            else:
                out[kind] = dataclasses.asdict(part)
        if self.train:
            out["train"] = dict(self.train)
        return out

    def label(self) -> str:
        """The leaderboard's name for the trial: its preset, or its parts when composed freely."""
        return self.name if self.name != "custom" else describe(self)

    def extra_epochs(self, train: TrainConfig) -> int:
        """Epochs after stage 1, derived from the second stage's phases."""
        if self.stage2 is None:
            return 0
        return STAGE2.get(self.stage2.name).extra_epochs(self.stage2.params, train)


def describe(cfg: RecipeConfig) -> str:
    """A few words for a composed recipe, e.g. ``ldam+drw+crt``."""
    words = [] if cfg.loss.name == "ce" else [cfg.loss.name]
    if cfg.weights is not None and cfg.weights.start != "never":
        words.append("cb" if cfg.weights.start in ("always", 0, 0.0) else "drw")
    s = cfg.sampler
    if s.then is not None:
        words.append(f"drs-{s.then}" if s.name == "instance" else f"{s.name}-{s.then}")
    elif s.name != "instance":
        words.append(s.name)
    if cfg.mixup is not None:
        words.append(cfg.mixup.kind)
    if cfg.arch.name != "plain":
        words.append("bbn" if cfg.arch.name == "bilateral" else cfg.arch.name)
    if cfg.finetune is not None and cfg.finetune.name != "full":
        words.append(cfg.finetune.name)
    if cfg.stage2 is not None:
        words.append(cfg.stage2.name)
    if cfg.posthoc is not None:
        words.append("posthoc")
    return "+".join(words) or "ce"


def _merge(kind: str, preset: Any, override: Any) -> Any:
    """A part given in ``method:`` over the preset's: null removes it, another name replaces it,
    the same name (or none) updates its parameters (nested parts likewise)."""
    if isinstance(override, str) and kind in ("loss", "arch", "finetune", "stage2", "sampler"):
        override = {"name": override}
    if kind == "stage2" and isinstance(override, dict) and override.get("name") == "none":
        return None
    return _deep_merge(preset, override)


def _deep_merge(base: Any, over: Any) -> Any:
    if not isinstance(over, dict) or not isinstance(base, dict):
        return over
    if "name" in over and over["name"] != base.get("name"):
        return dict(over)
    return {**base, **{k: _deep_merge(base.get(k), v) for k, v in over.items()}}


def load_recipe(data: Any, prefix: str = "method") -> RecipeConfig:
    """Expand ``method:`` (a preset name and part overrides) into a checked recipe."""
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {data!r}")
    unknown = [k for k in data if k not in METHOD_KEYS]
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}",
                          f"unknown key (a method has: {', '.join(METHOD_KEYS)})")
    name = data.get("name", "ce")
    if name not in PRESETS:
        raise ConfigError(f"{prefix}.name", f"unknown method {name!r} "
                                            f"(known presets: {', '.join(sorted(PRESETS))})")
    preset = PRESETS[name]
    parts: dict[str, Any] = {}
    for kind, default in DEFAULT_PARTS.items():
        value = preset.get(kind, default)
        if kind in data:
            value = _merge(kind, value, data[kind])
        if value is None and default is not None:
            value = default
        key = f"{prefix}.{kind}"
        if value is None:
            parts[kind] = None
        elif kind in REGISTRIES:
            parts[kind] = REGISTRIES[kind].parse(value, key)
        else:
            if isinstance(value, str):
                raise ConfigError(key, f"must be a mapping, got {value!r}")
            parts[kind] = from_dict(SECTIONS[kind], value, key)
    overrides = data.get("train") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix}.train", f"must be a mapping of train keys, got {overrides!r}")
    return RecipeConfig(name=name, train=dict(overrides), train_fill=dict(preset.get("train", {})),
                        **parts)


def _epoch_fields(obj) -> list[tuple[str, EpochAt]]:
    if obj is None:
        return []
    params = obj.params if isinstance(obj, PartConfig) else obj
    hints = type_hints(type(params))
    return [(f.name, getattr(params, f.name)) for f in dataclasses.fields(params)
            if hints[f.name] == EpochAt]


def check_recipe(cfg: RecipeConfig, train: TrainConfig, prefix: str = "method") -> None:
    """Rules across parts and against the run: epochs inside it, and no combination that
    cannot work."""
    for kind, part in cfg.parts().items():
        for name, value in _epoch_fields(part):
            check_epoch_at(value, f"{prefix}.{kind}.{name}", train.epochs,
                           inclusive=name != "start")
    arch = ARCHS.get(cfg.arch.name)
    if cfg.mixup is not None and not arch.single_branch:
        raise ConfigError(f"{prefix}.mixup", f"mixup needs a single-branch network; arch "
                                             f"{cfg.arch.name!r} has two branches")
    if cfg.stage2 is not None:
        stage = STAGE2.get(cfg.stage2.name)
        if not arch.single_branch:
            raise ConfigError(f"{prefix}.stage2", f"stage2 {cfg.stage2.name!r} needs the plain "
                                                  f"classifier; arch {cfg.arch.name!r} has two branches")
        head = head_of(cfg.arch.params).name
        if stage.needs_linear_classifier and head != "linear":
            raise ConfigError(f"{prefix}.stage2", f"stage2 {cfg.stage2.name!r} acts on the "
                                                  f"classifier's row norms; the {head} classifier "
                                                  "divides them out (use arch.classifier: linear)")
        nested = stage.nested_loss(cfg.stage2.params)
        if nested is not None:
            LOSSES.parse(nested, f"{prefix}.stage2.loss")


def check_backbone(cfg: RecipeConfig, backbone: dict, arch: str, prefix: str = "method") -> None:
    """Rules against what the backbone offers (``backbone``: :func:`ltsearch.models.describe`
    of ``arch``): a part that needs a conv map, a ResNet's residual blocks or a ViT's
    transformer blocks is refused, naming its key, where the backbone has none."""
    if not backbone["sequential"] and not ARCHS.get(cfg.arch.name).single_branch:
        raise ConfigError(f"{prefix}.arch", f"arch {cfg.arch.name!r} splits the last residual block "
                                            f"of one of our ResNets; {arch} has none")
    if cfg.stage2 is not None and STAGE2.get(cfg.stage2.name).needs_conv_map and not backbone["conv_map"]:
        raise ConfigError(f"{prefix}.stage2", f"stage2 {cfg.stage2.name!r} draws class activation "
                                              f"maps from a convolutional feature map; {arch} gives tokens")
    if head_of(cfg.arch.params).init == "text" and not backbone["text"]:
        raise ConfigError(f"{prefix}.arch.classifier.init", f"text encodes the class names with "
                          f"a CLIP text tower; {arch} has none (use open_clip:<name>, or class_mean)")
    tune = FINETUNE.get(cfg.finetune.name)
    if not tune.any_arch and not ARCHS.get(cfg.arch.name).single_branch:
        raise ConfigError(f"{prefix}.finetune", f"finetune {tune.name!r} needs the plain network; "
                                                f"arch {cfg.arch.name!r} has two branches")
    tune.check(cfg.finetune.params, backbone, f"{prefix}.finetune")


def check_counts(cfg: RecipeConfig, counts: list[int], prefix: str = "method") -> None:
    """Rules against the data's class counts (a part's ``check_counts``, such as feature_aug's
    tail split): a search checks them on the driver before Ray starts, a run when it builds."""
    for kind, part in cfg.parts().items():
        check = getattr(getattr(part, "params", None), "check_counts", None)
        if check is None:
            continue
        try:
            check(counts)
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{kind}.{e.key}", e.message) from None


def scale_recipe(cfg: RecipeConfig, ratio: float, stages: bool = False) -> dict:
    """The recipe's config with every absolute epoch-valued knob scaled (``--epochs``);
    ``stages``: the second stage's length (its ``epochs``) too, at least one epoch."""
    out = cfg.to_dict()
    for kind, part in cfg.parts().items():
        for name, value in _epoch_fields(part):
            out[kind][name] = scale_epoch(value, ratio)
    if stages and cfg.stage2 is not None and "epochs" in out["stage2"]:
        out["stage2"]["epochs"] = max(1, round(cfg.stage2.params.epochs * ratio))
    return out


class Recipe(Method):
    """Runs a :class:`RecipeConfig`: stage 1 with the loss, weights, sampler, mixup and
    architecture parts, then the second stage's phases, post-hoc adjustment at inference."""

    def __init__(self, cfg: RecipeConfig, ctx, train: TrainConfig):
        self.cfg = cfg
        self.ctx = ctx
        self.train_cfg = train
        check_counts(cfg, ctx.counts)
        counts = ctx.counts_tensor
        self.loss_fn = LOSSES.get(cfg.loss.name)(cfg.loss.params, counts)
        w = cfg.weights
        self.weights = class_weights(ctx.counts, w.scheme, w.beta).to(ctx.device) if w else None
        self.arch = ARCHS.get(cfg.arch.name)(cfg.arch.params, ctx)
        self.mixer = Mixer(cfg.mixup) if cfg.mixup is not None else None
        self.mixing = False
        self.epoch_weights = None
        self.stage2 = (STAGE2.get(cfg.stage2.name)(cfg.stage2.params, self)
                       if cfg.stage2 is not None else None)
        self.log_priors = log_priors(counts)
        self.finetune = FINETUNE.get(cfg.finetune.name)(cfg.finetune.params)
        self.pretrained: set = set()  # the body's own parameters (not the parts' additions)
        self._phases = [Phase("stage1", train, classifier_only=self.finetune.frozen_body,
                              params=lambda: self.finetune.trainable(self.model))]
        if self.stage2 is not None:
            for phase in type(self.stage2).phases(cfg.stage2.params, train):
                phase.params = self.stage2.trainable
                self._phases.append(phase)
        self.model: nn.Module | None = None

    # --- model and phases --------------------------------------------------------------------
    def build_model(self, build_body):
        self.model = self.arch.build_model(build_body)
        self.init_bias(self.model, self.loss_fn)
        if hasattr(self.model, "body"):
            self.pretrained = set(self.model.body.parameters())
            self.finetune.apply(self.model, self.ctx.num_classes)
        return self.model

    def init_bias(self, model, loss) -> None:
        value = loss.bias_init(self.ctx.num_classes)
        bias = getattr(model.classifier, "bias", None)
        if value is not None and bias is not None:
            nn.init.constant_(bias, value)

    def phases(self):
        return self._phases

    def _first(self, phase: Phase) -> bool:
        return phase is self._phases[0]

    def _loss_of(self, phase):
        return self.loss_fn if self._first(phase) else getattr(self.stage2, "loss_fn", None)

    def no_decay(self, phase):
        loss = self._loss_of(phase)
        bias = getattr(self.model.classifier, "bias", None)
        return {bias} if loss is not None and not loss.decay_bias and bias is not None else set()

    def features_cacheable(self, phase):
        if not hasattr(self.model, "body"):  # BBN: two branches, no one body
            return False
        if self._first(phase):
            return self.mixer is None
        return not STAGE2.get(self.cfg.stage2.name).needs_conv_map  # feature_aug: CAMs

    def lr_scales(self, phase):
        """Stage 1: the backbone's own parameters at ``backbone_lr_factor`` × the lr, and with
        ``layer_decay`` d the k-th of its G layer groups (stem first) at d^(G − k) — MAE's
        layer-wise decay (He et al. 2022, ``util/lr_decay.py``; BEiT's), the classifier and the
        parts' new modules at 1."""
        t = self.train_cfg
        if not self._first(phase) or (t.backbone_lr_factor == 1.0 and t.layer_decay is None):
            return {}
        from ltsearch.models import layer_groups

        groups = layer_groups(self.model.body) if t.layer_decay is not None else []
        scales = {p: t.backbone_lr_factor for p in self.pretrained}
        for k, group in enumerate(groups):
            for p in group:
                if p in self.pretrained:
                    scales[p] *= t.layer_decay ** (len(groups) - k)
        return scales

    def on_phase_start(self, phase, phase_index, resumed):
        if not self._first(phase):
            self.stage2.on_start(self.model, resumed)
        elif not resumed and hasattr(self.arch, "on_train_start"):
            self.arch.on_train_start(self.model)

    # --- one epoch ---------------------------------------------------------------------------
    def samplers(self, phase, epoch):
        total = phase.optim.epochs
        if not self._first(phase):
            return self.stage2.samplers(epoch, total)
        first = scheduled_sampler(self.cfg.sampler, self.ctx.index, epoch, total)
        return self.arch.samplers(first, epoch, total)

    def start_epoch(self, phase, epoch, steps, rng):
        if not self._first(phase):
            return self.stage2.start_epoch(epoch, steps, rng)
        total = phase.optim.epochs
        self.arch.start_epoch(epoch, total, steps, rng)
        until = resolve_epoch(self.cfg.mixup.until, total) if self.mixer else None
        self.mixing = self.mixer is not None and (until is None or epoch < until)
        if self.mixing:
            self.mixer.start_epoch(steps, rng)
        start = resolve_epoch(self.cfg.weights.start, total) if self.weights is not None else None
        self.epoch_weights = self.weights if start is not None and epoch >= start else None

    def loss(self, model, batches, phase, epoch, step):
        if not self._first(phase):
            return self.stage2.loss(model, batches, epoch, step)
        if self.mixing:
            b = batches[0]
            x, targets = self.mixer.mix(b.x, b.y, step, self.ctx.generator)
            logits = model(x)
        else:
            logits, targets = self.arch.forward(model, batches, step)
        normalize = self.cfg.weights.normalize if self.cfg.weights is not None else "batch"
        return objective(self.loss_fn, logits, targets, self.epoch_weights, normalize)

    def after_step(self, phase):
        if not self._first(phase):
            self.stage2.after_step()

    def end_epoch(self, phase):
        if not self._first(phase):
            self.stage2.end_epoch()

    def logits(self, model, x):
        z = self.stage2.logits(model, x) if self.stage2 is not None else model(x)
        if self.cfg.posthoc is not None:
            z = adjust_logits(z.float(), self.log_priors, self.cfg.posthoc.logit_adjust)
        return z

    def inference(self) -> dict:
        """What turns the network's outputs into predictions, as :meth:`logits` applies it:
        the second stage's and the architecture's (τ-norm's τ, LWS's scales, BBN's α), then
        post-hoc adjustment's τ and the priors it subtracts."""
        out = {**self.arch.inference(), **(self.stage2.inference() if self.stage2 else {})}
        if self.cfg.posthoc is not None:
            out["logit_adjust"] = {"tau": self.cfg.posthoc.logit_adjust,
                                   "class_priors": self.log_priors.exp().cpu().tolist()}
        return out

    def epoch_metrics(self, phase, epoch):
        return self.arch.epoch_metrics() if self._first(phase) else {}

    # --- state kept across checkpoint/resume --------------------------------------------------
    def state_dict(self):
        return {"stage2": self.stage2.state_dict() if self.stage2 is not None else {}}

    def load_state_dict(self, state):
        if self.stage2 is not None:
            self.stage2.load_state_dict(state.get("stage2", {}))


def reported_metrics() -> set[str]:
    """Per-epoch values the registered parts report beyond the trainer's (e.g. BBN's α)."""
    return {m for reg in REGISTRIES.values() for cls in reg.parts.values() for m in cls.metrics}
