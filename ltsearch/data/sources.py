"""Image sources, decoded once into uint8 arrays (N, C, H, W).

Every source yields a train pool, a test pool and, when the folder has one, a val pool; the
long-tail subset and the balanced validation split are drawn from the train pool afterwards
(:mod:`ltsearch.data.longtail`).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """Bad or missing data: the message names the folder or file."""


@dataclass
class ImageSet:
    x: np.ndarray  # uint8 (N, C, H, W)
    y: np.ndarray  # int64 (N,)

    def __len__(self):
        return len(self.y)

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def read(self, idx: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The images at ``idx`` (all where None), as :meth:`MappedSet.read` gives a cache's."""
        return self.x if idx is None else np.take(self.x, idx, axis=0, out=out)

    def take(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.x[idx], self.y[idx])


@dataclass
class Pools:
    """A source's pools; image files (:class:`FileSet`) are decoded by whoever reads them."""
    classes: list[str]
    train: "ImageSet | FileSet"
    test: "ImageSet | FileSet"
    val: "Optional[ImageSet | FileSet]" = None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (1797, 8, 8) pixel values 0–16 and their labels, read from the
    CSV its wheel ships (the file ``load_digits`` reads) without importing scikit-learn, an
    import that cost every search driver and ``ltsearch train`` about 4 s; ``load_digits``
    where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits_pools(test_per_class: int, seed: int = 0) -> Pools:
    """scikit-learn's 8x8 digits as 1x8x8 uint8 images; a stratified test pool per class."""
    images, target = digits_arrays()
    x = np.round(images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = target.astype(np.int64)
    rng = np.random.RandomState(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        if len(idx) <= test_per_class:
            raise DataError(f"digits: class {c} has {len(idx)} images, cannot hold out "
                            f"data.test_per_class={test_per_class}")
        test_idx.append(rng.permutation(idx)[:test_per_class])
    test_idx = np.sort(np.concatenate(test_idx))
    train_mask = np.ones(len(y), bool)
    train_mask[test_idx] = False
    return Pools([str(c) for c in range(10)], ImageSet(x[train_mask], y[train_mask]),
                 ImageSet(x[test_idx], y[test_idx]))


def _decode(path: Path, size: "Optional[int | tuple[int, int]]", mode: str = "RGB") -> np.ndarray:
    """One image file as uint8 (C, H, W): :func:`conform`, to ``mode`` and ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return conform(im, size, mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def conform(im, size: "Optional[int | tuple[int, int]]", mode: str = "RGB") -> np.ndarray:
    """A PIL image as uint8 (C, H, W): ``mode`` RGB (3 channels) or L (grey, 1), resized
    (bilinear) to ``size`` (a side, or (H, W)) where it differs."""
    from PIL import Image

    im = im.convert(mode)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if im.size != (width, height):
            im = im.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def stored_mode(shape: tuple) -> str:
    """The PIL mode images of a set stored as (C, H, W) = ``shape`` are decoded in."""
    return "L" if shape[0] == 1 else "RGB"


def decode_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A file as a set's stored images are, (C, H, W) = ``shape``: decoded as the image
    sources decode theirs (grey where C is 1)."""
    return _decode(path, tuple(shape[1:]), stored_mode(shape))


@dataclass
class FileSet:
    """Image files and labels, decoded only when taken (a long-tailed subset decodes ~1/4)."""
    paths: list[Path]
    y: np.ndarray
    size: Optional[int] = None

    def __len__(self):
        return len(self.y)

    def take(self, idx: np.ndarray) -> ImageSet:
        return decode_files([self.paths[i] for i in idx], self.y[idx], self.size)

    def load(self) -> ImageSet:
        return decode_files(self.paths, self.y, self.size)


def decode_files(paths: list[Path], labels: np.ndarray, size: Optional[int]) -> ImageSet:
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda p: _decode(p, size), paths))
    shapes = Counter(im.shape for im in images)
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd_path, odd = next((p, im) for p, im in zip(paths, images) if im.shape != common)
        raise DataError(f"{odd_path}: size {odd.shape[1:]} differs from the other images' "
                        f"{common[1:]}; set data.image_size to resize")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64))


def list_image_folder(folder: Path, classes: Optional[list[str]] = None,
                      size: Optional[int] = None) -> tuple[list[str], FileSet]:
    """List ``folder/<class>/<image>``; class order = sorted folder names, files sorted by name."""
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
        if not classes:
            raise DataError(f"no class folders in {folder}")
    elif found != classes:
        raise DataError(f"{folder}: class folders {found} differ from the train classes {classes}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"empty class folder: {folder / name}")
        paths += files
        labels += [c] * len(files)
    return classes, FileSet(paths, np.asarray(labels, dtype=np.int64), size)


def load_image_folder_pools(root: Path, size: Optional[int] = None) -> Pools:
    """A user's tree: ``root/train/<class>/…``, ``root/test/<class>/…``, optional ``root/val``."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"missing folder {root / part} (expected {root}/train/<class>/…, "
                            f"{root}/test/<class>/…)")
    classes, train = list_image_folder(root / "train", size=size)
    _, test = list_image_folder(root / "test", classes, size=size)
    val = None
    if (root / "val").is_dir():
        val = list_image_folder(root / "val", classes, size=size)[1]
    return Pools(classes, train, test, val)  # (files: decoded by build_data, or cached)


def _torchvision_cifar(root: Path, name: str) -> Pools:
    """The python-pickle CIFAR files torchvision's CIFAR10/CIFAR100 read (no download)."""
    base = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not base.is_dir():
        raise DataError(f"{name}: neither {base} (torchvision files) nor {root}/train (an "
                        "ImageFolder tree) exists")
    if name == "cifar10":
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_files = [base / "test_batch"]
        label_key, meta, names_key = b"labels", base / "batches.meta", b"label_names"
    else:
        train_files, test_files = [base / "train"], [base / "test"]
        label_key, meta, names_key = b"fine_labels", base / "meta", b"fine_label_names"

    def read(files):
        xs, ys = [], []
        for f in files:
            if not f.is_file():
                raise DataError(f"{name}: missing file {f}")
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return ImageSet(np.concatenate(xs), np.concatenate(ys))

    with open(meta, "rb") as fh:
        classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[names_key]]
    return Pools(classes, read(train_files), read(test_files))


def load_cifar_pools(root: Path, name: str) -> Pools:
    """CIFAR from torchvision's files under ``root`` or from an ImageFolder tree.

    The tree may be ``root`` itself (``root/train/<class>``) or ``root/<name>-jpeg`` (the layout
    ``cifar10-jpeg.tar.gz`` unpacks to).
    """
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    for tree in (root, root / f"{name}-jpeg"):
        if (tree / "train").is_dir():
            pools = load_image_folder_pools(tree)
            expected = 10 if name == "cifar10" else 100
            if len(pools.classes) != expected:
                raise DataError(f"{tree}: {len(pools.classes)} classes, {name} has {expected}")
            return pools
    return _torchvision_cifar(root, name)


def load_pools(source: str, root: Optional[str], *, test_per_class: int = 40,
               image_size: Optional[int] = None, splits: Optional[dict] = None) -> Pools:
    """``splits``: the split files of ``source: list`` (train, test, val, classes)."""
    if source == "digits":
        return load_digits_pools(test_per_class)
    if root is None:
        raise DataError(f"data.root is required for data.source={source!r}")
    path = Path(root).expanduser()
    if source in ("cifar10", "cifar100"):
        return load_cifar_pools(path, source)
    if source == "imagefolder":
        return load_image_folder_pools(path, image_size)
    if source == "list":
        from ltsearch.data.lists import load_list_pools

        return load_list_pools(path, size=image_size, **(splits or {}))
    raise DataError(f"unknown dataset {source!r}")
