"""A decoded dataset on the node's disk: image files decoded once, to a fixed size, into one
uint8 array read back as a memory map (the page cache shares it between every process of the
node). Keyed by what determines its bytes — the files (path, size, modification time), in order,
and the stored size — so a changed file, or another ``image_size``, is another cache.

One process builds under a lock while the others wait for it; the build is written into a
temporary folder and renamed into place, so an interrupted build (a crash, SIGKILL) leaves
nothing that looks complete, and the next opener builds again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from ltsearch.data.sources import DataError, FileSet, ImageSet, _decode

VERSION = 1  # of the layout: a new one builds anew


def cache_key(files: FileSet) -> str:
    """sha256 of the file list (path, size, mtime), the labels and the stored size."""
    digest = hashlib.sha256(json.dumps({"version": VERSION, "size": files.size}).encode())
    for path, label in zip(files.paths, files.y.tolist()):
        st = os.stat(path)
        digest.update(f"{os.fspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def open_cached(files: FileSet, cache_dir: Path, progress: bool = True) -> ImageSet:
    """The decoded images of ``files`` as a read-only memory map, built first where no complete
    cache holds them."""
    if files.size is None:
        raise DataError("data.cache_dir needs data.image_size (every cached image has one size)")
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(files)
    final = cache_dir / key[:32]
    if not (final / "meta.json").is_file():
        with open(cache_dir / f"{key[:32]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then find it
            if not (final / "meta.json").is_file():
                _build(files, final, key, progress)
    return _open(final, key)


def _open(folder: Path, key: str) -> ImageSet:
    meta = json.loads((folder / "meta.json").read_text())
    if meta["key"] != key:
        raise DataError(f"{folder}: a cache of other files (its key differs); remove it")
    x = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    return ImageSet(x, np.load(folder / "labels.npy"))


def _build(files: FileSet, final: Path, key: str, progress: bool) -> None:
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # an interrupted build's remains
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    n, s = len(files), files.size
    out = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=(n, 3, s, s))
    bar = _Bar(n, f"decoding {n} images into {final}") if progress else None

    def one(i: int) -> None:
        out[i] = _decode(files.paths[i], s)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(one, range(n)), start=1):
            if bar is not None:
                bar.update(done)
    out.flush()
    np.save(tmp / "labels.npy", files.y)
    (tmp / "meta.json").write_text(json.dumps({"key": key, "shape": [n, 3, s, s],
                                               "files": n}))
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


def cached_pool(files: FileSet, cache_dir: Optional[str]) -> FileSet | ImageSet:
    return files if cache_dir is None else open_cached(files, Path(cache_dir))
