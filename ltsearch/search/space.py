"""Search-space files: a base trial config, search settings and a conditional space.

```yaml
base:            # an ``ltsearch train`` config (defaults fill the rest)
  data: {source: digits}
  train: {epochs: 6}
search:          # settings, overridable on the command line
  num_samples: 12
space:
  train:         # distributions over training knobs, for every trial
    lr: {loguniform: [0.01, 0.2]}
  method:        # one entry per preset, with distributions over its parts' parameters
    ce: {}
    reweight:
      weights.scheme: {choice: [inverse, sqrt, effective]}
      weights.beta: {uniform: [0.9, 0.9999], when: {weights.scheme: effective}}
    custom:      # a free composition
      loss.name: {choice: [ce, ldam, balanced_softmax]}
      loss.max_m: {uniform: [0.3, 0.6], when: {loss.name: ldam}}
      stage2.name: {choice: [none, crt, lws]}
      train.weight_decay: {loguniform: [1e-4, 5e-3]}   # this preset's own training keys
```

Distributions: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``int: [lo, hi]`` (inclusive),
``choice: [a, b, …]``; a plain value is a constant. A parameter is ``part.param`` (dotted, or
nested mappings). ``when: {param: value | [values]}`` makes it exist only when an earlier
parameter of the same preset has one of the values.

Everything is validated here, before Ray starts: each distribution's extremes and each choice are
substituted into the base config and run through the one config validator, so a bad value gets
the same message as in ``ltsearch train``, keyed by its path in this file.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ltsearch.config import ConfigError, from_dict, read_yaml
from ltsearch.dotted import nested
from ltsearch.recipes import PRESETS
from ltsearch.recipes.recipe import METHOD_KEYS, REGISTRIES, check_counts
from ltsearch.runconfig import compressed, config_from_dict
from ltsearch.search.records import SEED
from ltsearch.search.settings import SearchSettings

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
class SearchSpace:
    base: dict
    settings: SearchSettings
    train: dict[str, Dist]  # "train.lr" style keys (any base section)
    methods: dict[str, dict[str, Dist]]
    source: dict  # the file as read, with the command line's overrides of its search settings

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
        """The full ``ltsearch train`` config of a trial from its flat suggested values, every
        part expanded: the one builder every layer uses (the trial, trials.json, MLflow,
        export), so each shows the same config."""
        cfg = config_from_dict(self._given(flat)).to_dict()
        cfg["train"]["threads"] = max(1, int(self.settings.resources.cpu))
        return cfg

    def _given(self, flat: dict) -> dict:
        """The base config with the trial's values put in (before presets expand); a
        confirmation trial's fresh seed too."""
        cfg = copy.deepcopy(self.base)
        if SEED in flat:
            cfg[SEED] = flat[SEED]
        names = list(self.methods)
        method = flat.get("method", names[0])
        values = {}
        for param, dist in self.methods[method].items():
            key = f"{method}.{param}"
            if key in flat:
                values[param] = flat[key]
            elif dist.kind == "const" and _active(dist, values):
                values[param] = dist.args[0]
        cfg["method"] = method_dict(method, values)
        for key, dist in self.train.items():
            value = flat[key] if key in flat else dist.args[0]
            section, name = key.split(".", 1)
            cfg.setdefault(section, {})[name] = value
        return cfg

    @staticmethod
    def label(cfg: dict) -> str:
        """The leaderboard's name of a trial config: its preset, or its parts if composed."""
        return config_from_dict(cfg).method.label()

    def check_counts(self, counts: list[int]) -> None:
        """Every corner of the space against the data's class counts (feature_aug's tail split),
        on the driver once it has the data, before Ray starts."""
        for preset, dists in self.methods.items():
            _check_combinations(self.base, self.train, preset, dists,
                                lambda cfg: check_counts(config_from_dict(cfg).method, counts))


def _active(dist: Dist, values: dict) -> bool:
    return all(values.get(k) in v for k, v in dist.when.items())


def method_dict(preset: str, values: dict) -> dict:
    """{"loss.name": "focal", "loss.gamma": 2} → {"name": preset, "loss": {"name": "focal", …}}."""
    return {"name": preset, **nested(values)}


def _assignment_for(dists: dict[str, Dist], fixed: dict) -> Optional[dict]:
    """Every parameter that exists at its first value, those in ``fixed`` at theirs, with the
    conditions they need made to hold; None when ``fixed`` cannot all exist at once."""
    needed: dict = {}
    chain = list(fixed)
    while chain:  # the conditions of the fixed parameters, of those conditions, …
        for cond, vals in dists[chain.pop()].when.items():
            if cond not in needed:
                needed[cond] = vals
                chain.append(cond)
    values: dict = {}
    for name, dist in dists.items():
        if not _active(dist, values):
            if name in fixed:
                return None
            continue
        if name in fixed:
            if name in needed and fixed[name] not in needed[name]:
                return None
            values[name] = fixed[name]
            continue
        options = dist.extremes()
        allowed = [v for v in options if v in needed[name]] if name in needed else options
        values[name] = (allowed or options)[0]
    return values


def _combinations(base: dict, knobs: dict[str, Dist], preset: str, dists: dict[str, Dist]):
    """Each value at the ends of every range (and every choice), alone and paired with every
    other parameter's (the preset as it is when nothing is searched): (config dict, the values
    fixed as (key, value) pairs, the varied one last)."""
    params = [(f"space.{k}", k, d, True) for k, d in knobs.items()]
    params += [(f"space.method.{preset}.{p}", p, d, False) for p, d in dists.items()]
    pairs = [] if params else [[]]  # with parameters, their first values come first anyway
    for i, first in enumerate(params):
        for second in [None, *params[i + 1:]]:
            for a in first[2].extremes():
                pairs += [[(first, a)] + ([(second, b)] if second else [])
                          for b in (second[2].extremes() if second else [None])]
    for fixed in pairs:
        cfg = copy.deepcopy(base)
        for key, dist in knobs.items():
            value = next((v for (_, k, _, g), v in fixed if g and k == key), dist.extremes()[0])
            section, name = key.split(".", 1)
            cfg = _with(cfg, section, name, value)
        values = _assignment_for(dists, {k: v for (_, k, _, g), v in fixed if not g})
        if values is None:
            continue
        cfg["method"] = method_dict(preset, values)
        yield cfg, [(p[0], v) for p, v in fixed]


def _check_combinations(base: dict, knobs: dict[str, Dist], preset: str, dists: dict[str, Dist],
                        check: Callable[[dict], Any] = config_from_dict) -> None:
    """``check`` on every config of :func:`_combinations`: a space whose values can combine into
    an invalid trial (``train.epochs`` and an absolute ``weights.start`` both searched) is refused
    before anything runs, naming the parameter the error is about (else the one varied), its
    value and the value it was paired with."""
    firsts = {f"space.{k}": d.extremes()[0] for k, d in knobs.items()}
    firsts.update({f"space.method.{preset}.{p}": d.extremes()[0] for p, d in dists.items()})
    for cfg, fixed in _combinations(base, knobs, preset, dists):
        try:
            check(cfg)
        except ConfigError as e:
            if not fixed:
                raise ConfigError(f"space.method.{preset}", f"at its first values: {e.message}") from None
            varied = [(k, v) for k, v in fixed if v != firsts[k]]
            # the searched parameter the error names; else the one varied last
            named = f"space.{e.key}".replace("space.method.", f"space.method.{preset}.", 1)
            key = named if named in firsts else fixed[-1][0]
            value = dict(fixed).get(key, firsts[key])
            others = [(k, v) for k, v in varied if k != key]
            given = f" with {others[0][0]} = {others[0][1]!r}" if others else ""
            raise ConfigError(key, f"value {value!r}{given}: {e.message}") from None


def rungs_check(fractions: list[float]) -> Callable[[dict], Any]:
    """A trial config, and its runs at every rung, through the one validator: an absolute
    epoch-valued knob can be valid in the full run and not in a compressed one (DRW from epoch 15
    of 16 is epoch 4 of a 4-epoch rung, past its end)."""
    def check(cfg: dict) -> None:
        run = config_from_dict(cfg)
        for f in fractions[:-1]:
            try:
                compressed(run, f)
            except ConfigError as e:
                raise ConfigError(e.key, f"{e.message}, in the rung at {f:g} of the run "
                                         f"(search.asha.rungs); give it as a fraction of the "
                                         f"run, which every rung keeps") from None
    return check


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
            if section == "data" and name != "augment":
                # the driver builds the data once for every trial: a searched subset would be
                # recorded in each trial's config but never trained on
                raise ConfigError(key, "every trial trains on the same data (the search builds "
                                       "it once); only data.augment may be searched. Run one "
                                       "search per data setting")
            if section == "train" and name == "metrics":
                raise ConfigError(key, "every trial is selected by the same metrics: set "
                                       "train.metrics in base")
            _with(base, section, name, None)  # the base section must be a mapping
            knobs[f"{section}.{name}"] = dist

    # every trial's rungs, settled on the shortest run a searched train.epochs allows
    epochs = knobs["train.epochs"].extremes() if "train.epochs" in knobs else []
    settings.asha.settle(min(epochs or [config_from_dict(base).train.epochs]))
    method_space = space.get("method")
    if method_space is None:
        base_method = base.get("method") or {}
        base_method = {"name": base_method} if isinstance(base_method, str) else base_method
        method_space = {base_method.get("name", "ce"): {}}
    if not isinstance(method_space, dict) or not method_space:
        raise ConfigError("space.method", "must map at least one method name to its parameters")
    methods: dict[str, dict[str, Dist]] = {}
    for name, params in method_space.items():
        mkey = f"space.method.{name}"
        if name not in PRESETS:
            raise ConfigError(mkey, f"unknown method {name!r} (known: {', '.join(sorted(PRESETS))})")
        dists = _parse_method_space(name, _flatten_params(params or {}, mkey), mkey)
        _check_combinations(base, knobs, name, dists)
        if len(settings.asha.fractions()) > 1:  # then each rung's run of those combinations
            _check_combinations(base, knobs, name, dists, rungs_check(settings.asha.fractions()))
        _check_ranges(name, dists, mkey)
        methods[name] = dists
    return SearchSpace(base, settings, knobs, methods, {**data, "search": search} if search else data)


def _flatten_params(params: Any, key: str) -> dict:
    """A preset's space as dotted parameters; nested mappings (``loss: {gamma: …}``) or dotted
    keys (``loss.gamma: …``) are both accepted; a mapping with a distribution key is a leaf."""
    if not isinstance(params, dict):
        raise ConfigError(key, "must be a mapping of part parameter → distribution")
    out: dict = {}
    for name, value in params.items():
        if isinstance(value, dict) and not (set(value) & {*DIST_KINDS, "when"}):
            for sub, v in _flatten_params(value, f"{key}.{name}").items():
                out[f"{name}.{sub}"] = v
        else:
            out[str(name)] = value
    return out


def _parse_method_space(preset: str, params: dict, mkey: str) -> dict[str, Dist]:
    dists: dict[str, Dist] = {}
    kinds = [k for k in METHOD_KEYS if k != "name"]
    for param, value in params.items():
        key = f"{mkey}.{param}"
        kind = param.split(".", 1)[0]
        if kind not in kinds or "." not in param:
            raise ConfigError(key, f"not a part parameter of method {preset!r}: name a part and "
                                   f"its parameter, e.g. loss.gamma (parts: {', '.join(kinds)})")
        dist = parse_dist(value, key)
        prefix = param.rsplit(".", 1)[0]
        dist.when = {(c if c in dists or f"{prefix}.{c}" not in dists else f"{prefix}.{c}"): v
                     for c, v in dist.when.items()}
        for cond, allowed in dist.when.items():
            if cond not in dists:
                raise ConfigError(f"{key}.when.{cond}",
                                  f"must name a parameter of {preset!r} listed before {param!r}")
            choices = dists[cond].extremes() if dists[cond].kind in ("choice", "const") else None
            bad = [v for v in allowed if choices is not None and v not in choices]
            if bad:
                raise ConfigError(f"{key}.when.{cond}", f"{bad[0]!r} is not one of {cond}'s "
                                                        f"values {choices}")
        dists[param] = dist
    return dists


def _check_ranges(preset: str, dists: dict[str, Dist], mkey: str) -> None:
    """Rules between two ranges of one part (feature_aug's every τg < every τs)."""
    for kind, registry in REGISTRIES.items():
        named = dists.get(f"{kind}.name")
        part = (PRESETS[preset].get(kind) or {}).get("name")
        candidates = named.extremes() if named else [part]
        for cand in candidates:
            if cand not in registry.parts:
                continue
            check = getattr(registry.get(cand).Params, "check_ranges", None)
            if check is None:
                continue
            ranges = {k.split(".", 1)[1]: (min(d.extremes()), max(d.extremes()))
                      for k, d in dists.items() if k.startswith(kind + ".") and k.count(".") == 1
                      and all(isinstance(v, (int, float)) for v in d.extremes())}
            try:
                check(ranges)
            except ConfigError as e:
                raise ConfigError(f"{mkey}.{kind}.{e.key}", e.message) from None


def load_search_file(path: str | Path, overrides: Optional[dict] = None) -> SearchSpace:
    data = read_yaml(path)
    try:
        return parse_search_file(data, overrides)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} (in {path})") from None
