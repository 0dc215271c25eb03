"""Typed run configuration, validated in one place.

A trial config is YAML with four sections (``data``, ``model``, ``train``, ``method``) plus
``seed``. Every section is a small dataclass; :func:`load_config` walks them and rejects an
unknown key, a wrong type or an out-of-range value with one :class:`ConfigError` that names the
dotted key (``train.lr``, ``method.loss.gamma``). The recipe parts declare their own parameters
and are checked by the same walker one layer up (:mod:`ltsearch.runconfig`): this module
imports nothing from the recipes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; ``key`` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self):  # survives pickling (a Ray trial's error reaches the driver intact)
        return type(self), (self.key, self.message)


def spec(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, doc: str = "",
         factory=None):
    """A dataclass field with numeric bounds checked by :func:`from_dict`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# The generic walker


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            dict: "a mapping"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"must be null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, f"must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:  # a nested part (e.g. a stage's loss), checked by its own registry
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a declaration error, not user input
        raise TypeError(f"unsupported config type {tp} at {key}")
    raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")


def _check_bounds(value, meta, key):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and not value >= meta["ge"]:
        raise ConfigError(key, f"must be >= {meta['ge']}, got {value!r}")
    if meta.get("gt") is not None and not value > meta["gt"]:
        raise ConfigError(key, f"must be > {meta['gt']}, got {value!r}")
    if meta.get("le") is not None and not value <= meta["le"]:
        raise ConfigError(key, f"must be <= {meta['le']}, got {value!r}")
    if meta.get("lt") is not None and not value < meta["lt"]:
        raise ConfigError(key, f"must be < {meta['lt']}, got {value!r}")


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> dict:
    """A dataclass's resolved field types (resolving string annotations is slow: once each)."""
    return typing.get_type_hints(cls)


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking keys, types and bounds.

    After the fields, ``cls.check(self)`` (if defined) may raise ``ConfigError`` with a key
    relative to this section for cross-field rules; it is re-raised with the full path.
    """
    def path(name):
        return f"{prefix}.{name}" if prefix else name

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {data!r}")
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(path(str(unknown[0])),
                          f"unknown key (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(path(name), "is required")
            continue
        value = _coerce(data[name], hints[name], path(name))
        _check_bounds(value, f.metadata, path(name))
        if isinstance(value, list):
            for i, v in enumerate(value):
                _check_bounds(v, f.metadata, f"{path(name)}[{i}]")
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(path(e.key) if e.key else prefix, e.message) from None
    return obj


# --------------------------------------------------------------------------------------------
# Epoch-valued knobs

EpochAt = typing.Union[Literal["always", "never"], int, float]
EPOCH_AT_DOC = ("an epoch (integer, 0-based), a fraction of the run (0.0–1.0), 'always' or "
                "'never'")


def resolve_epoch(value: EpochAt, total: int) -> Optional[int]:
    """The 0-based epoch an epoch-valued knob names in a run of ``total`` epochs (None: never).
    Fractions make a preset valid at any length (DRW at 0.8 is epoch 160 of 200); a fraction
    below 1 names an epoch inside the run however short it is (0.8 of 2 epochs is epoch 1, not
    2, past the end), so a compressed run still has its deferred part."""
    if value == "always":
        return 0
    if value == "never":
        return None
    if isinstance(value, float):
        epoch = round(value * total)
        return min(epoch, total - 1) if value < 1.0 else epoch
    return value


def check_epoch_at(value: EpochAt, key: str, total: int, *, inclusive: bool = False) -> None:
    """A fraction lies in [0, 1]; an absolute epoch lies inside the run (or at its end)."""
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"a fraction of the run must lie in [0, 1], got {value!r} "
                               "(give whole epochs as an integer)")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0 or (value > total if inclusive else value >= total):
            bound = f"<= train.epochs ({total})" if inclusive else f"below train.epochs ({total})"
            raise ConfigError(key, f"must be {bound}, got {value}")


def scale_epoch(value: EpochAt, ratio: float) -> EpochAt:
    """An absolute epoch scaled with the run's length (``--epochs``); fractions stay."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, round(value * ratio))
    return value


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class AugmentConfig:
    """Batched on-device augmentation (pad-and-crop or random-resized-crop, horizontal flip,
    normalisation) and the evaluation's centre crop."""
    crop_pad: int = spec(4, ge=0, doc="zero padding before the random crop; 0 turns cropping off")
    hflip: bool = spec(True, doc="random horizontal flip with p=0.5")
    random_resized_crop: bool = spec(False, doc="ImageNet-style: a box of area fraction in "
                                     "scale and aspect ratio in ratio, resized to the input size "
                                     "(instead of pad-and-crop)")
    scale: list[float] = spec(factory=lambda: [0.08, 1.0], gt=0.0, le=1.0,
                              doc="random_resized_crop: the box's area fraction [min, max]")
    ratio: list[float] = spec(factory=lambda: [0.75, 4 / 3], gt=0.0,
                              doc="random_resized_crop: the box's aspect ratio [min, max]")
    eval_crop_pct: Optional[float] = spec(None, gt=0.0, le=1.0, doc="evaluation: resize to "
                                          "size / pct and keep the centre (timm's crop_pct); "
                                          "null: the whole image")

    def check(self):
        for key in ("scale", "ratio"):
            v = getattr(self, key)
            if len(v) != 2 or v[0] > v[1]:
                raise ConfigError(key, f"must be [min, max] with min <= max, got {v}")
        if self.random_resized_crop and self.crop_pad:
            raise ConfigError("crop_pad", "random_resized_crop crops already: set crop_pad: 0")


@dataclass
class DataConfig:
    source: Literal["digits", "cifar10", "cifar100", "imagefolder", "list"] = spec(
        "digits", doc="digits is scikit-learn's load_digits, shipped with the package; list: "
                      "split files (train, test, val) of 'relative/path label' lines or CSV")
    root: Optional[str] = spec(None, doc="folder of the data (torchvision files, an ImageFolder "
                               "tree, or the root the split files' paths are relative to)")
    train: Optional[str] = spec(None, doc="list: the training split file (.txt lines or .csv)")
    val: Optional[str] = spec(None, doc="list: the validation split file (optional)")
    test: Optional[str] = spec(None, doc="list: the test split file")
    classes: Optional[str] = spec(None, doc="list: a file of class names, one a line, in index order")
    profile: Literal["exp", "step", "none"] = spec(
        "exp", doc="long-tail profile over classes; none keeps the data as it is")
    imbalance_factor: float = spec(10.0, ge=1.0, doc="n_max / n_min; 1 keeps classes balanced")
    step_minor_fraction: float = spec(0.5, gt=0.0, lt=1.0, doc="share of classes that are minor (step)")
    max_per_class: Optional[int] = spec(None, gt=0, doc="n_max; default: the largest class")
    val_per_class: int = spec(10, ge=0, doc="balanced validation images per class, held out first")
    test_per_class: int = spec(40, gt=0, doc="digits only: stratified test images per class")
    image_size: Optional[int] = spec(None, gt=0, doc="imagefolder, list: resize to this square size")
    cache_dir: Optional[str] = spec(None, doc="imagefolder, list: decode the images once into a "
                                    "memory-mapped cache in this folder on the node's disk, reused "
                                    "by every later run, search and resume (needs image_size)")
    subset_seed: int = spec(0, doc="numpy seed of the LDAM-DRW per-class shuffle")
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self):
        if self.source == "list":
            for key in ("root", "train", "test"):
                if getattr(self, key) is None:
                    raise ConfigError(key, "required with source: list (the split files and "
                                           "the folder their paths are relative to)")
        if self.cache_dir is not None and self.source not in ("imagefolder", "list"):
            raise ConfigError("cache_dir", f"caches image files (imagefolder, list); {self.source} "
                                           "is read whole from its own files")
        if self.cache_dir is not None and self.image_size is None:
            raise ConfigError("cache_dir", "needs image_size (every cached image has one size)")
        if self.source != "list":
            for key in ("train", "val", "test", "classes"):
                if getattr(self, key) is not None:
                    raise ConfigError(key, f"split files are read with source: list, not "
                                           f"{self.source}")


@dataclass
class ModelConfig:
    arch: str = spec(
        "resnet32", doc="resnet8 … resnet110 are the CIFAR ResNets (resnet32: LDAM-DRW's, BBN's), "
        "resnet18, resnet34 and resnet50 torchvision's, all from scratch; any other name (or "
        "timm:<name>) is a timm model, e.g. vit_base_patch16_224 (checked by ltsearch.models)")
    weights: Optional[str] = spec(None, doc="timm models: a local weights file (safetensors, "
                                  ".pth, .bin) or folder (a Hugging Face cache entry); never "
                                  "downloaded")
    options: dict = spec(factory=dict, doc="timm models: keyword arguments of timm.create_model "
                         "(img_size, drop_path_rate, …)")


@dataclass
class MetricsConfig:
    groups: Literal["thresholds", "thirds"] = spec("thresholds", doc="many/medium/few by the "
                                                   "thresholds below, or thirds by training count")
    many_threshold: int = spec(100, ge=0, doc="many-shot: more than this many training images")
    few_threshold: int = spec(20, ge=0, doc="few-shot: fewer than this many training images")

    def check(self):
        if self.few_threshold > self.many_threshold:
            raise ConfigError("few_threshold", "must not exceed many_threshold")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule of one training phase."""
    epochs: int = spec(200, ge=1)
    batch_size: int = spec(128, ge=1)
    lr: float = spec(0.1, gt=0.0)
    momentum: float = spec(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = spec(2e-4, ge=0.0)
    warmup_epochs: int = spec(5, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = spec(factory=lambda: [160, 180], ge=1)
    gamma: float = spec(0.01, gt=0.0, le=1.0, doc="lr factor at each milestone (cumulative)")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``: linear warm-up, then step or cosine decay."""
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1) / self.warmup_epochs
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "cosine":
            span = max(1, self.epochs - self.warmup_epochs)
            return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
        return self.lr


TRAIN_PRESETS: dict[str, dict] = {
    # LDAM-DRW's CIFAR-LT recipe (Cao et al., NeurIPS 2019).
    "cifar_lt": dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=False,
                     weight_decay=2e-4, warmup_epochs=5, schedule="step",
                     milestones=[160, 180], gamma=0.01),
    # BBN's CIFAR recipe (Zhou et al., CVPR 2020, reference config).
    "bbn_cifar": dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                      weight_decay=2e-4, warmup_epochs=5, schedule="step",
                      milestones=[120, 160], gamma=0.01),
}
DEFAULT_TRAIN_PRESET = "cifar_lt"


@dataclass
class TrainConfig(OptimConfig):
    preset: Literal["cifar_lt", "bbn_cifar", "none"] = spec(
        DEFAULT_TRAIN_PRESET, doc="recipe whose values fill the optimiser keys not given "
                                  "(default: the method preset's, else cifar_lt)")
    device: str = spec("auto", doc="auto, cpu, cuda or cuda:N")
    threads: int = spec(2, ge=1, doc="torch.set_num_threads on CPU")
    compile: bool = spec(True, doc="CUDA only: torch.compile(mode='reduce-overhead')")
    amp: bool = spec(True, doc="CUDA only: bf16 autocast")
    eval_every: int = spec(1, ge=1)
    eval_batch_size: Optional[int] = spec(None, ge=1, doc="default: 1024 on CUDA, 128 on CPU "
                                               "(large batches are slower on CPU)")
    backbone_lr_factor: float = spec(1.0, gt=0.0, doc="stage 1: the backbone's own weights "
                                     "learn at this factor of lr (the classifier and added modules at lr)")
    layer_decay: Optional[float] = spec(None, gt=0.0, le=1.0, doc="stage 1: layer-wise lr "
                                        "decay, the k-th of G layer groups at decay^(G-k) (MAE)")
    tta: Literal["none", "flip", "five_crop"] = spec(
        "none", doc="test-time augmentation: the mean logits of each image and its mirror image "
                    "(flip), or of LIFT's five crops (five_crop)")
    tta_expand: int = spec(24, ge=1, doc="five_crop: resize to the input size + this, then crop")
    feature_cache: bool = spec(True, doc="a classifier-only phase on a frozen body without "
                               "augmentation computes the body's features once (a linear probe's: "
                               "once per worker), not every epoch")
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def check(self):
        if self.warmup_epochs > self.epochs:
            raise ConfigError("warmup_epochs", f"must not exceed epochs ({self.epochs})")


def load_train(data: Any, fill: Optional[dict] = None, overrides: Optional[dict] = None,
               prefix: str = "train") -> TrainConfig:
    """The train section: a preset's values, then ``fill`` (a method preset's recipe), then the
    keys given in ``data``, then ``overrides`` (``method.train``). A preset's milestones are
    relative to its length: given other epochs and no milestones, they scale with the run."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {data!r}")
    fill = dict(fill or {})
    given = {**data, **(overrides or {})}
    preset = given.get("preset", fill.pop("preset", DEFAULT_TRAIN_PRESET))
    if preset not in TRAIN_PRESETS and preset != "none":
        raise ConfigError(f"{prefix}.preset", "must be one of "
                          f"{', '.join(repr(p) for p in [*TRAIN_PRESETS, 'none'])}, got {preset!r}")
    base = dict(TRAIN_PRESETS.get(preset, {}))
    merged = {**base, **fill, **given, "preset": preset}
    epochs = merged.get("epochs")
    if (base and "milestones" not in fill and "milestones" not in given
            and isinstance(epochs, int) and epochs > 0 and epochs != base["epochs"]):
        ratio = epochs / base["epochs"]
        merged["milestones"] = sorted({max(1, round(m * ratio)) for m in base["milestones"]})
        if "warmup_epochs" not in fill and "warmup_epochs" not in given:
            merged["warmup_epochs"] = min(base["warmup_epochs"], epochs)
    return from_dict(TrainConfig, merged, prefix)


TOP_KEYS = ("seed", "data", "model", "train", "method")


@dataclass
class Config:
    """A whole run. ``method`` is the recipe (:class:`ltsearch.recipes.RecipeConfig`), built and
    checked by :func:`ltsearch.runconfig.config_from_dict`; this module knows no method."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None

    def to_dict(self) -> dict:
        return {"seed": self.seed, "data": dataclasses.asdict(self.data),
                "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train),
                "method": self.method.to_dict()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
    silently, so a config would not say what it does)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError("", f"{path}: not valid YAML: not text") from None
    except yaml.YAMLError as e:  # one line: where and what
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{where}: not valid YAML: {problem}") from None


def writable_folder(path: Path, flag: str) -> Path:
    """A folder the command may write: not a file, and writable — tried with a probe file that
    is removed again, so a check that fails leaves nothing behind (permission bits alone do
    not tell, for root or on a read-only mount)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} is a file, not a folder")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ConfigError(flag, f"cannot write to {path}: {e.strerror or e}") from None
    finally:
        for p in created:  # deepest first; made again when there is something to write
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    return path
