"""A decoded dataset on the node's disk: image files decoded once, to a fixed size, into one
uint8 array read back as a memory map (the page cache shares it between every process of the
node). Keyed by what determines its bytes — the files (path, size, modification time), in order,
and the stored size — so a changed file, or another ``image_size``, is another cache.

One process builds under a lock while the others wait for it; the build is written into a
temporary folder and renamed into place, so an interrupted build (a crash, SIGKILL) leaves
nothing that looks complete, and the next opener builds again.

What a trial receives is a :class:`MappedSet`: the cache's key, its folder as configured and the
rows it holds, never the pixels. It pickles as that (plus the file list, to build the cache
again on a node that has none) and opens its memory map where it is unpickled, so the search
driver, Ray's object store and each worker hold no image; batches are read from the map by
index (:mod:`ltsearch.data.stream`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from ltsearch.data.sources import DataError, FileSet, ImageSet, _decode

VERSION = 2  # of the layout (2: channels last): a new one builds anew


def cache_key(files: FileSet) -> str:
    """sha256 of the file list (path, size, mtime), the labels and the stored size."""
    digest = hashlib.sha256(json.dumps({"version": VERSION, "size": files.size}).encode())
    for path, label in zip(files.paths, files.y.tolist()):
        st = os.stat(path)
        digest.update(f"{os.fspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def resolve_dir(cache_dir: str | os.PathLike) -> Path:
    """``data.cache_dir`` on this node: ``~`` and ``$VARS`` expanded here (a node-local path
    per node, or one shared folder)."""
    return Path(os.path.expandvars(os.fspath(cache_dir))).expanduser()


def open_cached(files: FileSet, cache_dir: str | os.PathLike, progress: bool = True,
                key: Optional[str] = None) -> "MappedSet":
    """The decoded images of ``files`` (every row), built first where no complete cache holds
    them. ``key``: the one the files had where the set was made (checked against this node's)."""
    if files.size is None:
        raise DataError("data.cache_dir needs data.image_size (every cached image has one size)")
    folder = resolve_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    here = cache_key(files)
    if key is not None and here != key:
        raise DataError(f"the image files differ on {socket.gethostname()} from where the search "
                        f"started (their sizes or modification times; first: {files.paths[0]}); "
                        f"give every node the same files")
    final = folder / here[:32]
    if not (final / META).is_file():
        with open(folder / f"{here[:32]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then find it
            if not (final / META).is_file():
                _build(files, final, here, progress)
    meta = _meta(final, here)
    return MappedSet(os.fspath(cache_dir), here, tuple(meta["shape"]),
                     np.arange(meta["shape"][0]), np.asarray(files.y, dtype=np.int64), files)


META = "meta.json"


def _meta(folder: Path, key: str) -> dict:
    meta = json.loads((folder / META).read_text())
    if meta["key"] != key:
        raise DataError(f"{folder}: a cache of other files (its key differs); remove it")
    return meta


class MappedSet:
    """Rows of a decoded cache, read by index from its memory map (the page cache's pages, not
    this process's memory). ``take`` composes rows; nothing is read until ``read``."""

    def __init__(self, cache_dir: str, key: str, shape: tuple, rows: np.ndarray, y: np.ndarray,
                 files: FileSet):
        self.cache_dir, self.key, self.shape = cache_dir, key, tuple(shape)
        self.rows, self.y, self.files = np.asarray(rows, dtype=np.int64), y, files
        self._array: Optional[np.memmap] = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def channels(self) -> int:
        return int(self.shape[1])

    @property
    def image_shape(self) -> tuple:
        return tuple(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.image_shape))

    def take(self, idx: np.ndarray) -> "MappedSet":
        taken = MappedSet(self.cache_dir, self.key, self.shape, self.rows[idx], self.y[idx], self.files)
        taken._array = self._array
        return taken

    @property
    def array(self) -> np.memmap:
        """The whole cache, mapped read-only (opened, or built, on this node at first use), as
        it is stored: (N, H, W, C), each image's pixels together (a row of the batch a crop
        reads whole, and the layout the CPU's uint8 resize and the convolutions run in)."""
        if self._array is None:
            folder = resolve_dir(self.cache_dir) / self.key[:32]
            if not (folder / META).is_file():  # another node: build (or wait for) its own
                open_cached(self.files, self.cache_dir, progress=False, key=self.key)
            _meta(folder, self.key)
            n, c, h, w = self.shape
            self._array = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=(n, h, w, c))
        return self._array

    def read(self, idx: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The images at positions ``idx`` of this set (all where None), as uint8 (n, C, H, W)
        with channels-last strides (``torch.from_numpy`` of it is a channels_last tensor);
        ``out``: an (n, H, W, C) buffer to gather into."""
        rows = self.rows if idx is None else self.rows[idx]
        return np.asarray(np.take(self.array, rows, axis=0, out=out)).transpose(0, 3, 1, 2)

    def load(self) -> ImageSet:
        """Every image in memory (for data that fits, and tests)."""
        return ImageSet(self.read(), self.y)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # the key, folder and rows, never the pixels


def _build(files: FileSet, final: Path, key: str, progress: bool) -> None:
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # an interrupted build's remains
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    n, s = len(files), files.size
    out = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=(n, s, s, 3))
    bar = _Bar(n, f"decoding {n} images into {final}") if progress else None

    def one(i: int) -> None:
        out[i] = _decode(files.paths[i], s).transpose(1, 2, 0)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(one, range(n)), start=1):
            if bar is not None:
                bar.update(done)
    out.flush()
    np.save(tmp / "labels.npy", files.y)
    (tmp / META).write_text(json.dumps({"key": key, "shape": [n, 3, s, s], "files": n}))
    os.rename(tmp, final)  # atomic: complete, or not there
    if bar is not None:
        bar.close()


class _Bar:
    """A one-line progress bar on a terminal; nothing elsewhere (logs stay quiet)."""

    def __init__(self, total: int, what: str, out=None):
        self.total, self.what, self.out = total, what, out or sys.stderr
        self.tty = self.out.isatty()
        self.shown = -1

    def update(self, done: int) -> None:
        step = done * 20 // self.total
        if self.tty and step != self.shown:
            self.shown = step
            self.out.write(f"\r[{'#' * step}{'.' * (20 - step)}] {done}/{self.total} {self.what}")
            self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


