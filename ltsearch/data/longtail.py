"""Long-tailed subsets, drawn the way LDAM-DRW draws them (Cao et al., NeurIPS 2019).

Per-class counts follow the exponential profile n_i = int(n_max · (1/IF)^(i/(C−1))) or the step
profile (the last ``step_minor_fraction`` of the classes get int(n_max / IF)). Selection: numpy
``RandomState(seed)``; for each class in label order, shuffle the class's indices (in file order)
and keep the first n_i. A balanced validation split is taken from the *end* of each shuffled
order before the subset is drawn, so with ``val_per_class=0`` the subset is LDAM-DRW's exactly and
with a validation split only classes whose pool runs short are truncated (n_i is capped at
what the class has left). Profile ``none`` keeps every image, for data that is long-tailed already.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import logging

import numpy as np

from ltsearch.data.sources import DataError, FileSet, ImageSet, Pools, load_pools

if TYPE_CHECKING:
    from ltsearch.data.cache import MappedSet

log = logging.getLogger(__name__)


def class_counts(profile: str, n_max: int, num_classes: int, imbalance_factor: float,
                 step_minor_fraction: float = 0.5) -> list[int]:
    """Images per class, head first (Cui et al. 2019 / Cao et al. 2019 CIFAR-LT profiles)."""
    if imbalance_factor < 1:
        raise DataError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    if profile == "none" or num_classes == 1:
        return [n_max] * num_classes
    if profile == "exp":
        return [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1)))
                for i in range(num_classes)]
    if profile == "step":
        n_major = num_classes - int(round(num_classes * step_minor_fraction))
        return [n_max if i < n_major else int(n_max / imbalance_factor) for i in range(num_classes)]
    raise DataError(f"unknown long-tail profile {profile!r}")


def select_longtail(labels: np.ndarray, counts: list[int], val_per_class: int = 0,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the long-tailed train subset and of the balanced validation split."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        if len(idx) < val_per_class + 1:
            raise DataError(f"class {c} has {len(idx)} training images, fewer than "
                            f"data.val_per_class={val_per_class} + 1")
        pool = idx[:len(idx) - val_per_class]
        train.append(pool[:n])
        val.append(idx[len(idx) - val_per_class:])
    return np.concatenate(train), np.concatenate(val)


@dataclass
class LongTailData:
    """Everything a trial trains and evaluates on: uint8 arrays in memory, or rows of the node's
    decoded cache (:class:`ltsearch.data.cache.MappedSet`, with ``data.cache_dir``)."""
    classes: list[str]
    train: "ImageSet | MappedSet"
    val: "ImageSet | MappedSet"
    test: "ImageSet | MappedSet"
    counts: list[int]  # training images per class

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.channels

    def summary(self) -> str:
        return (f"{len(self.classes)} classes, train {len(self.train)} (max {max(self.counts)}, "
                f"min {min(self.counts)}), val {len(self.val)}, test {len(self.test)}")


def build_data(cfg, pools: Optional[Pools] = None) -> LongTailData:
    """Load the source named by ``cfg`` (a DataConfig) and draw its long-tailed subset."""
    if pools is None:
        pools = load_pools(cfg.source, cfg.root, test_per_class=cfg.test_per_class,
                           image_size=cfg.image_size,
                           splits=dict(train=cfg.train, test=cfg.test, val=cfg.val, classes=cfg.classes))
    cache_dir = getattr(cfg, "cache_dir", None)
    if cache_dir is not None:  # decoded once into the node's cache (the subsets read from it)
        from ltsearch.data.cache import open_cached

        pools = Pools(pools.classes, *(open_cached(p, cache_dir) if isinstance(p, FileSet) else p
                                       for p in (pools.train, pools.test, pools.val)))
    pools.test, pools.val = (p.load() if isinstance(p, FileSet) else p for p in (pools.test, pools.val))
    y = pools.train.y
    C = len(pools.classes)
    per_class = np.bincount(y, minlength=C)
    if (per_class == 0).any():
        raise DataError(f"class {pools.classes[int(np.argmin(per_class))]!r} has no training images")
    if pools.val is not None:  # the folder brings its own validation split
        val_per_class = 0
    else:
        val_per_class = cfg.val_per_class
    # n_max: the largest class of the pool (5000 / 500 for CIFAR-10 / -100, as published);
    # a class whose pool is smaller than its n_i keeps all it has.
    n_max = cfg.max_per_class or int(per_class.max())
    counts = class_counts(cfg.profile, n_max, C, cfg.imbalance_factor, cfg.step_minor_fraction)
    train_idx, val_idx = select_longtail(y, counts, val_per_class, cfg.subset_seed)
    train = pools.train.take(train_idx)
    if pools.val is not None:
        val = pools.val
    elif len(val_idx):
        val = pools.train.take(val_idx)
    else:
        log.warning("data.val_per_class=0: validation metrics are computed on the test set "
                    "(the published protocol); a search would then select on test")
        val = pools.test
    actual = np.bincount(train.y, minlength=C).tolist()
    if min(actual) == 0:
        raise DataError(f"class {pools.classes[actual.index(0)]!r} has no images in the long-tailed "
                        "subset; lower data.imbalance_factor")
    return LongTailData(pools.classes, train, val, pools.test, actual)
