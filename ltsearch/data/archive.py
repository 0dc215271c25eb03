"""Unpacking a data archive (CIFAR-10's JPEG copy) into a folder, for the slow tests and the
device scripts: nothing in a search or a training run unpacks anything."""
from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path


def unpack(archive: str | Path, dest: str | Path) -> Path:
    """``archive`` (.tar.gz) into ``dest``, created if absent; returns ``dest``. It unpacks into
    a staging folder inside ``dest`` and moves the top-level entries in at the end, so an
    interrupted or refused unpack leaves nothing that looks complete. The system's ``tar``
    where there is one: for CIFAR-10's 60,000 small files it takes about 2.5 s where Python's
    ``tarfile`` takes about 50 s (a Python call per member, on 2 cores). Either raises on a
    member that would land outside the folder (GNU tar refuses ``..`` in a name; ``tarfile``
    with its ``data`` filter refuses that and more)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=dest))
    try:
        tar = shutil.which("tar")
        if tar:
            out = subprocess.run([tar, "-xzf", str(archive), "-C", str(staging), "--no-same-owner"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise OSError(f"could not unpack {archive}: {out.stderr.strip()}")
        else:
            with tarfile.open(archive) as t:
                t.extractall(staging, filter="data")
        for entry in staging.iterdir():
            entry.replace(dest / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def unpacked(archive: str | Path, dest: str | Path, top: str) -> Path:
    """``dest``, with ``archive`` unpacked into it unless its top folder ``top`` is there
    already: :func:`unpack` moves it in only once complete, so its presence means a whole copy."""
    dest = Path(dest)
    return dest if (dest / top).is_dir() else unpack(archive, dest)
