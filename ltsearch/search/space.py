"""Search-space files: a base trial config, search settings and a conditional space.

```yaml
base:            # an ``ltsearch train`` config (defaults fill the rest)
  data: {source: digits}
  train: {epochs: 6}
search:          # settings, overridable on the command line
  num_samples: 12
space:
  train:         # distributions over training knobs
    lr: {loguniform: [0.01, 0.2]}
  method:        # one entry per method, with only its own parameters
    ce: {}
    reweight:
      weighting: {choice: [inverse, sqrt, effective]}
      beta: {uniform: [0.9, 0.9999], when: {weighting: effective}}
```

Distributions: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``int: [lo, hi]`` (inclusive),
``choice: [a, b, …]``; a plain value is a constant. ``when: {param: value | [values]}`` makes a
method parameter exist only when an earlier parameter of the same method has one of the values.

Everything is validated here, before Ray starts: each distribution's extremes and each choice are
substituted into the base config and run through the one config validator, so a bad value gets
the same message as in ``ltsearch train``, keyed by its path in this file.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ltsearch.config import ConfigError, config_from_dict, from_dict, read_yaml, spec
from ltsearch.methods import get_method, method_names

DIST_KINDS = ("uniform", "loguniform", "int", "choice")


@dataclass
class Dist:
    kind: str  # uniform | loguniform | int | choice | const
    args: list
    when: dict = field(default_factory=dict)  # param → allowed values

    def extremes(self) -> list:
        return list(self.args) if self.kind in ("choice", "const") else [self.args[0], self.args[1]]

    def suggest(self, trial, name: str):
        if self.kind == "uniform":
            return trial.suggest_float(name, self.args[0], self.args[1])
        if self.kind == "loguniform":
            return trial.suggest_float(name, self.args[0], self.args[1], log=True)
        if self.kind == "int":
            return trial.suggest_int(name, self.args[0], self.args[1])
        if self.kind == "choice":
            return trial.suggest_categorical(name, self.args)
        return self.args[0]


def parse_dist(value: Any, key: str) -> Dist:
    if not isinstance(value, dict):
        return Dist("const", [value])
    value = dict(value)
    when = value.pop("when", {})
    if not isinstance(when, dict):
        raise ConfigError(f"{key}.when", "must be a mapping of parameter → value(s)")
    when = {k: v if isinstance(v, list) else [v] for k, v in when.items()}
    kinds = [k for k in value if k in DIST_KINDS]
    unknown = [k for k in value if k not in DIST_KINDS]
    if unknown or len(kinds) != 1:
        bad = unknown[0] if unknown else ""
        raise ConfigError(f"{key}.{bad}" if bad else key,
                          f"a distribution is one of {', '.join(DIST_KINDS)} (and optional 'when')")
    kind = kinds[0]
    args = value[kind]
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{key}.{kind}", "must be a non-empty list")
    if kind == "choice":
        return Dist(kind, args, when)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{key}.{kind}", f"must be [low, high], got {args!r}")
    lo, hi = args
    if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{key}.{kind}", f"bounds must be integers, got {args!r}")
    if not lo < hi if kind != "int" else not lo <= hi:
        raise ConfigError(f"{key}.{kind}", f"empty range [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{key}.{kind}", f"log-uniform needs low > 0, got {lo}")
    return Dist(kind, [lo, hi], when)


@dataclass
class Resources:
    cpu: float = spec(1.0, gt=0.0)
    gpu: float = spec(0.0, ge=0.0, doc="fractional GPUs share one device, e.g. 0.25")


@dataclass
class AshaSettings:
    enabled: bool = True
    grace_period: int = spec(1, ge=1, doc="epochs before ASHA may stop a trial")
    reduction_factor: float = spec(2.0, gt=1.0)


@dataclass
class SearchSettings:
    metric: str = spec("val/balanced_acc", doc="a reported metric, e.g. val/top1")
    mode: Literal["max", "min"] = "max"
    num_samples: int = spec(12, ge=1)
    max_concurrent: int = spec(2, ge=1)
    resources: Resources = field(default_factory=Resources)
    asha: AshaSettings = field(default_factory=AshaSettings)
    seed: int = spec(0, doc="Optuna TPE sampler seed")
    max_failures: int = spec(0, ge=0, doc="retries of a failing trial")
    checkpoint_every: int = spec(1, ge=1, doc="epochs between trial checkpoints")
    experiment: Optional[str] = spec(None, doc="MLflow experiment (default: ltsearch)")
    cover_methods: bool = spec(True, doc="the first trials try each method once, then TPE")

    def check(self):
        if not (self.metric.startswith("val/") or self.metric.startswith("train/")):
            raise ConfigError("metric", f"must be a val/… or train/… metric, got {self.metric!r}")


@dataclass
class SearchSpace:
    base: dict
    settings: SearchSettings
    train: dict[str, Dist]  # "train.lr" style keys (any base section)
    methods: dict[str, dict[str, Dist]]
    source: dict  # the file as read

    # --- define-by-run for Optuna ------------------------------------------------------------
    def define(self, trial) -> None:
        """Suggest one trial's values; parameters exist only for their method (and ``when``)."""
        for key, dist in self.train.items():
            dist.suggest(trial, key)
        names = list(self.methods)
        method = trial.suggest_categorical("method", names) if len(names) > 1 else names[0]
        chosen: dict[str, Any] = {}
        for param, dist in self.methods[method].items():
            if all(chosen.get(k) in v for k, v in dist.when.items()):
                chosen[param] = dist.suggest(trial, f"{method}.{param}")

    def trial_config(self, flat: dict) -> dict:
        """The full ``ltsearch train`` config of a trial from its flat suggested values."""
        cfg = copy.deepcopy(self.base)
        names = list(self.methods)
        method = flat.get("method", names[0])
        params = {}
        for param, dist in self.methods[method].items():
            key = f"{method}.{param}"
            if key in flat:
                params[param] = flat[key]
            elif dist.kind == "const" and all(params.get(k) in v for k, v in dist.when.items()):
                params[param] = dist.args[0]
        cfg["method"] = {"name": method, **params}
        for key, dist in self.train.items():
            value = flat[key] if key in flat else dist.args[0]
            section, name = key.split(".", 1)
            cfg.setdefault(section, {})[name] = value
        return cfg

    def max_epochs(self) -> int:
        """ASHA's max_t: the longest trial the space allows (extra phases included)."""
        base_epochs = config_from_dict(self.base).train.epochs
        epochs = self.train.get("train.epochs")
        top = max(epochs.extremes()) if epochs else base_epochs
        extra = 0
        for name, params in self.methods.items():
            cls = get_method(name)
            for combo in _corner_params(params):
                p = from_dict(cls.Params, combo, f"space.method.{name}")
                extra = max(extra, cls.extra_epochs(p))
        return int(top + extra)


def _corner_params(params: dict[str, Dist]) -> list[dict]:
    """Parameter sets at every choice of each parameter and both ends of each range."""
    out = [{}]
    for name, dist in params.items():
        out = [{**o, name: v} for o in out for v in dist.extremes()][:256]
    return out


def _with(base: dict, section: str, name: str, value) -> dict:
    cfg = copy.deepcopy(base)
    cfg.setdefault(section, {})
    if not isinstance(cfg[section], dict):
        raise ConfigError(f"base.{section}", "must be a mapping")
    cfg[section][name] = value
    return cfg


def _rekey(e: ConfigError, key: str, value) -> ConfigError:
    return ConfigError(key, f"value {value!r}: {e.message}")


def parse_search_file(data: Any, overrides: Optional[dict] = None) -> SearchSpace:
    if not isinstance(data, dict):
        raise ConfigError("", "a search file must be a mapping with base, search and space")
    unknown = [k for k in data if k not in ("base", "search", "space")]
    if unknown:
        raise ConfigError(str(unknown[0]), "unknown key (known keys: base, search, space)")
    base = data.get("base") or {}
    try:
        config_from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"base.{e.key}" if e.key else "base", e.message) from None
    search = dict(data.get("search") or {})
    search.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = from_dict(SearchSettings, search, "search")

    space = data.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError("space", "must be a mapping")
    unknown = [k for k in space if k not in ("train", "data", "model", "method")]
    if unknown:
        raise ConfigError(f"space.{unknown[0]}", "unknown key (known keys: train, data, model, method)")

    knobs: dict[str, Dist] = {}
    for section in ("train", "data", "model"):
        entries = space.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"space.{section}", "must be a mapping")
        for name, value in entries.items():
            key = f"space.{section}.{name}"
            dist = parse_dist(value, key)
            if dist.when:
                raise ConfigError(f"{key}.when", "only method parameters can be conditional")
            for v in dist.extremes():
                try:
                    config_from_dict(_with(base, section, name, v))
                except ConfigError as e:
                    raise _rekey(e, key, v) from None
            knobs[f"{section}.{name}"] = dist

    method_space = space.get("method")
    if method_space is None:
        base_method = (base.get("method") or {}).get("name", "ce")
        method_space = {base_method: {k: v for k, v in (base.get("method") or {}).items() if k != "name"}}
    if not isinstance(method_space, dict) or not method_space:
        raise ConfigError("space.method", "must map at least one method name to its parameters")
    methods: dict[str, dict[str, Dist]] = {}
    for name, params in method_space.items():
        mkey = f"space.method.{name}"
        if name not in method_names():
            raise ConfigError(mkey, f"unknown method {name!r} (known: {', '.join(method_names())})")
        params = params or {}
        if not isinstance(params, dict):
            raise ConfigError(mkey, "must be a mapping of parameter → distribution")
        cls = get_method(name)
        fields = [f.name for f in dataclasses.fields(cls.Params)]
        dists: dict[str, Dist] = {}
        for param, value in params.items():
            key = f"{mkey}.{param}"
            if param not in fields:
                raise ConfigError(key, f"not a parameter of method {name!r} "
                                       f"(its parameters: {', '.join(fields) or 'none'})")
            dist = parse_dist(value, key)
            for cond in dist.when:
                if cond not in dists:
                    raise ConfigError(f"{key}.when.{cond}",
                                      f"must name a parameter of {name!r} listed before {param!r}")
            dists[param] = dist
        # Each value is checked with the method's other parameters at their first value.
        first = {p: d.extremes()[0] for p, d in dists.items()}
        for param, dist in dists.items():
            for v in dist.extremes():
                try:
                    config_from_dict({**base, "method": {"name": name, **first, param: v}})
                except ConfigError as e:
                    raise _rekey(e, f"{mkey}.{param}", v) from None
        check = getattr(cls.Params, "check_ranges", None)
        if check is not None:
            ranges = {p: (min(d.extremes()), max(d.extremes())) for p, d in dists.items()
                      if d.kind in ("uniform", "loguniform", "int", "const")
                      and all(isinstance(v, (int, float)) for v in d.extremes())}
            try:
                check(ranges)
            except ConfigError as e:
                raise ConfigError(f"{mkey}.{e.key}", e.message) from None
        methods[name] = dists
    return SearchSpace(base, settings, knobs, methods, data)


def load_search_file(path: str | Path, overrides: Optional[dict] = None) -> SearchSpace:
    data = read_yaml(path)
    try:
        return parse_search_file(data, overrides)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} (in {path})") from None
