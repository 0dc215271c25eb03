"""A whole run's config, method-aware: the schema (:mod:`ltsearch.config`) and the recipes
(:mod:`ltsearch.recipes`) meet here, one layer above both.

The method's preset may carry its paper's training recipe (a fill under the train keys given),
and ``method.train`` overrides the train section for that method; the result is checked once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ltsearch.config import (TOP_KEYS, Config, ConfigError, DataConfig, ModelConfig, _coerce,
                             from_dict, load_train, read_yaml)
from ltsearch.models import check_model, describe
from ltsearch.recipes import check_backbone, check_recipe, load_recipe, scale_recipe


def config_from_dict(data: Any) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"a config must be a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(str(unknown[0]), f"unknown key (known keys: {', '.join(TOP_KEYS)})")
    recipe = load_recipe(data.get("method"))
    try:
        train = load_train(data.get("train"), fill=recipe.train_fill, overrides=recipe.train)
    except ConfigError as e:  # a key that came from method.train is named there
        name = e.key.split(".")[1] if e.key.count(".") else ""
        if name and name in recipe.train:
            raise ConfigError(f"method.train.{name}", e.message) from None
        raise
    cfg = Config(seed=_coerce(data.get("seed", 0), int, "seed"),
                 data=from_dict(DataConfig, data.get("data"), "data"),
                 model=from_dict(ModelConfig, data.get("model"), "model"),
                 train=train, method=recipe)
    check_recipe(cfg.method, cfg.train)
    check_model(cfg.model, load=False)
    check_backbone(cfg.method, describe(cfg.model), cfg.model.arch)
    return cfg


def load_config(path: str | Path) -> Config:
    return config_from_dict(read_yaml(path))


def config_origin(path: str | Path) -> dict:
    """Where an exported config came from: its leading ``# ltsearch.<key>: value`` lines
    (``ltsearch export`` and ``best_config.yaml`` write the search folder and trial)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(": ")
        if key.startswith("ltsearch.") and value:
            out[key] = value.strip()
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def with_epochs(cfg: Config, epochs: int, *, whole_recipe: bool = False) -> Config:
    """The same run over ``epochs``: milestones and absolute epoch-valued method knobs scale with
    it, warm-up is kept (capped), and the result goes through validation again. ``whole_recipe``:
    warm-up and the second stage's length scale too (a compressed copy of the whole recipe)."""
    ratio = epochs / cfg.train.epochs
    d = cfg.to_dict()
    warmup = round(cfg.train.warmup_epochs * ratio) if whole_recipe else cfg.train.warmup_epochs
    d["train"].update(epochs=epochs, warmup_epochs=min(warmup, epochs),
                      milestones=sorted({max(1, round(m * ratio)) for m in cfg.train.milestones}))
    d["method"] = scale_recipe(cfg.method, ratio, stages=whole_recipe)
    overrides = d["method"].get("train", {})
    for key in ("epochs", "warmup_epochs", "milestones"):
        if key in overrides:
            overrides[key] = d["train"][key]
    return config_from_dict(d)


def compressed(cfg: Config, fraction: float) -> Config:
    """The whole recipe over ``fraction`` of its length: stage 1, its warm-up and milestones, the
    second stage, each shortened alike (at least an epoch each); fraction-valued knobs (DRW at
    0.8, BBN's α over the run, mixup until 0.9) keep their place in it. What a search's rungs
    train (:mod:`ltsearch.search.rungs`); ``fraction`` 1 is the run itself."""
    if fraction >= 1.0:
        return cfg
    return with_epochs(cfg, max(1, round(cfg.train.epochs * fraction)), whole_recipe=True)


def run_epochs(cfg: Config) -> int:
    """All the epochs a run trains: stage 1 and the second stage's."""
    return cfg.train.epochs + cfg.method.extra_epochs(cfg.train)
