"""The decode-once cache on disk: built once by racing processes (the same bytes for both), an
interrupted build (SIGKILL mid-write) never reused, a changed file another key. Real processes,
real PNG/JPEG files of mixed sizes."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltsearch.data import DataError
from ltsearch.data.cache import cache_key, open_cached
from ltsearch.data.sources import FileSet, decode_files

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import hashlib, sys, time
sys.path.insert(0, {root!r})
import numpy as np
import ltsearch.data.cache as cache
from ltsearch.data.sources import FileSet
paths = {paths!r}
slow = {slow}
decode = cache._decode
def _decode(path, size):
    time.sleep(slow)
    return decode(path, size)
cache._decode = _decode
build = cache._build
def _build(*a, **k):
    print("BUILT", flush=True)
    return build(*a, **k)
cache._build = _build
images = cache.open_cached(FileSet(paths, np.arange(len(paths)) % 3, 16), {folder!r}, progress=False)
print(hashlib.sha256(np.ascontiguousarray(images.read()).tobytes()).hexdigest(), flush=True)
"""


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for n in range(24):
        side = int(rng.integers(20, 41))
        path = tmp_path / "img" / f"{n}.{'png' if n % 2 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side + n % 4, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return FileSet(paths, np.arange(24) % 3, 16)


def _child(files, folder, slow=0.0):
    code = CHILD.format(root=str(ROOT), paths=[str(p) for p in files.paths], slow=slow, folder=str(folder))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _digest(x) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def test_two_racing_processes_build_it_once_and_read_the_same_bytes(files, tmp_path):
    folder = tmp_path / "cache"
    procs = [_child(files, folder, slow=0.02) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(out.count("BUILT") for out in outs) == 1  # one built, the other waited
    want = _digest(decode_files(files.paths, files.y, 16).x)  # the images decoded in memory
    assert [out[-1] for out in outs] == [want, want]
    cached = open_cached(files, folder, progress=False)
    assert isinstance(cached.array, np.memmap) and np.array_equal(cached.y, files.y)


def test_an_interrupted_build_is_never_reused(files, tmp_path):
    folder = tmp_path / "cache"
    proc = _child(files, folder, slow=0.2)
    assert proc.stdout.readline().strip() == "BUILT"
    time.sleep(1.0)  # a few images written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in folder.iterdir())
    assert any(".tmp-" in n for n in left) and not any(n == cache_key(files)[:32] for n in left)
    again = _child(files, folder)
    out = again.communicate(timeout=120)[0].split()
    assert out[0] == "BUILT" and out[-1] == _digest(decode_files(files.paths, files.y, 16).x)
    assert not any(".tmp-" in p.name for p in folder.iterdir())  # the remains were removed


def test_a_changed_file_or_size_is_another_cache(files, tmp_path):
    key = cache_key(files)
    assert cache_key(FileSet(files.paths, files.y, 24)) != key
    time.sleep(0.01)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(files.paths[5])
    assert cache_key(files) != key
    assert cache_key(FileSet(files.paths, (files.y + 1) % 3, 16)) != cache_key(files)
    with pytest.raises(DataError, match="data.cache_dir needs data.image_size"):
        open_cached(FileSet(files.paths, files.y, None), tmp_path / "c")


def test_build_data_decodes_once_into_the_cache_and_reads_it_after(tmp_path, monkeypatch):
    import ltsearch.data.cache as cache
    import ltsearch.data.sources as sources
    from ltsearch.data import build_data
    from ltsearch.runconfig import config_from_dict

    rng = np.random.default_rng(1)
    for part, n in (("train", 8), ("test", 3)):
        for c in ("cat", "dog"):
            (tmp_path / "tree" / part / c).mkdir(parents=True)
            for i in range(n):
                side = int(rng.integers(20, 41))
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / part / c / f"{i}.png")
    data = {"source": "imagefolder", "root": str(tmp_path / "tree"), "image_size": 12,
            "imbalance_factor": 2, "val_per_class": 1}
    plain = build_data(config_from_dict({"data": data}).data)
    cfg = config_from_dict({"data": {**data, "cache_dir": str(tmp_path / "cache")}}).data
    first = build_data(cfg)
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 2  # the train and test pools

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "_decode", no_decoding)
    monkeypatch.setattr(sources, "_decode", no_decoding)
    again = build_data(cfg)  # a later run, search or resume on this node: read, not decoded
    for a, b, c in ((plain.train, first.train, again.train), (plain.test, first.test, again.test),
                    (plain.val, first.val, again.val)):
        assert np.array_equal(a.x, b.read()) and np.array_equal(b.read(), c.read())
        assert np.array_equal(a.y, c.y)
    with pytest.raises(Exception, match="data.cache_dir: caches image files"):
        config_from_dict({"data": {"source": "digits", "cache_dir": str(tmp_path)}})
