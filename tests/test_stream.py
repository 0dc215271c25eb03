"""Cached images read a batch at a time (``data.cache_dir``): what a trial receives is the
cache's rows, never its pixels; a node without the cache builds its own; training reads the
same numbers as from images held in memory; a worker's memory is flat in the cache's size."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIGITS, write_list_dataset
from ltsearch.data import DataError, build_data
from ltsearch.data.cache import MappedSet
from ltsearch.data.device import channel_stats
from ltsearch.data.stream import StreamedImages
from ltsearch.runconfig import config_from_dict
from ltsearch.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _config(data: dict, **train):
    return config_from_dict({**DIGITS, "data": {**data, "augment": {"crop_pad": 2, "hflip": True}},
                             "train": {**DIGITS["train"], "batch_size": 8, "epochs": 4, **train}})


@pytest.fixture
def listed(tmp_path):
    return write_list_dataset(tmp_path / "images")


def test_a_cached_set_trains_to_the_same_numbers_as_the_images_in_memory(listed, tmp_path, monkeypatch):
    """Streamed from the memory map (read one batch ahead) and held whole on the device: the
    same losses, metrics and weights as the images decoded into memory, augmentation included."""
    plain = _config(listed)
    cached = _config({**listed, "cache_dir": str(tmp_path / "cache")})
    memory, mapped = build_data(plain.data), build_data(cached.data)
    assert isinstance(mapped.train, MappedSet) and not isinstance(memory.train, MappedSet)
    assert np.array_equal(mapped.train.read(), memory.train.x)
    runs = {}
    for name, cfg, data, resident in (("memory", plain, memory, None), ("streamed", cached, mapped, False),
                                      ("resident", cached, mapped, True)):
        monkeypatch.setattr(StreamedImages, "resident", resident)
        trainer = Trainer(cfg, data)
        assert isinstance(trainer.train_set, StreamedImages) == (name != "memory")
        assert (name == "streamed") == (getattr(trainer.train_set, "x", "held") is None)
        result = trainer.fit()
        runs[name] = ([{k: v for k, v in h.items() if "time" not in k and "per_s" not in k
                        and v == v} for h in result.history], trainer.model.state_dict())
    for name in ("streamed", "resident"):
        assert runs[name][0] == runs["memory"][0]
        assert all(torch.equal(runs[name][1][k], v) for k, v in runs["memory"][1].items())
    assert runs["memory"][0][-1]["test/top1"] > 0.4  # (it learned: 4 classes, a colour each)


def test_what_a_trial_receives_is_rows_not_pixels_and_another_node_builds_its_own(listed, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("NODE_DISK", str(tmp_path / "node-a"))
    cfg = _config({**listed, "image_size": 64, "cache_dir": "$NODE_DISK/ltsearch"})
    data = build_data(cfg.data)
    assert (tmp_path / "node-a" / "ltsearch").is_dir()  # expanded where it was opened
    pixels = sum(s.nbytes for s in (data.train, data.val, data.test))
    sent = pickle.dumps(data)
    assert len(sent) < pixels / 20, (len(sent), pixels)  # keys, rows and file names
    # another node: its own disk (the same variable, another folder), no cache there yet
    monkeypatch.setenv("NODE_DISK", str(tmp_path / "node-b"))
    there = pickle.loads(sent)
    assert not (tmp_path / "node-b").exists()  # nothing read yet: nothing opened
    for a, b in ((data.train, there.train), (data.val, there.val), (data.test, there.test)):
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.y, b.y)
    built = sorted(p.parent.name for p in (tmp_path / "node-b" / "ltsearch").glob("*/meta.json"))
    assert built == sorted(p.parent.name for p in (tmp_path / "node-a" / "ltsearch").glob("*/meta.json"))
    # a third node whose files are not the ones the search started with: refused, by name
    monkeypatch.setenv("NODE_DISK", str(tmp_path / "node-c"))
    stale = pickle.loads(sent)
    Image.new("RGB", (12, 12)).save(Path(listed["root"]) / "train/c0/0.jpg")
    with pytest.raises(DataError, match=r"image files differ on .* from where the search started .*train/c0/0.jpg"):
        stale.train.read([0])


def test_channel_statistics_of_a_cached_set_come_from_an_even_sample(listed, tmp_path):
    cfg = _config({**listed, "cache_dir": str(tmp_path / "cache")})
    train = build_data(cfg.data).train
    x = train.read().astype(np.float64) / 255
    mean, std = channel_stats(train)
    assert np.allclose(mean, x.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std, x.std(axis=(0, 2, 3), ddof=1), atol=1e-6)
    every_third = x[np.unique(np.linspace(0, len(x) - 1, len(x) // 3).round().astype(int))]
    mean, std = channel_stats(train, sample=len(x) // 3)
    assert np.allclose(mean, every_third.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std, every_third.std(axis=(0, 2, 3), ddof=1), atol=1e-6)


WORKER = """
import json, pickle, sys, time
sys.path.insert(0, {root!r})
import torch
from ltsearch.data import LongTailData
from ltsearch.runconfig import config_from_dict
from ltsearch.trainer import Trainer

def anon_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024

data = pickle.loads(open({data!r}, "rb").read())  # as a trial worker receives it
cfg = config_from_dict({config!r})
trainer = Trainer(cfg, data)
train = trainer.train_set
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
gen = torch.Generator().manual_seed(0)
model, opt = trainer.model, torch.optim.SGD(trainer.model.parameters(), lr=0.01)
peak = 0.0
for k, (idx, raw) in enumerate(train.steps(order[:{steps} * 32], 32)):
    x, y = train.batch(idx, gen, raw=raw)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    peak = max(peak, anon_mb())
val = trainer.evaluate(trainer.val_set, "val")
print(json.dumps({{"anon_mb": max(peak, anon_mb()), "train": len(train), "val": val["val/top1"]}}))
"""


def _fake_cache(folder: Path, images: int, classes: int = 100, side: int = 224) -> MappedSet:
    """A cache of ``images`` 224-px images as a build leaves it, its image file sparse (the
    disk holds none of it; a read gives zeros through the page cache, as a real one does)."""
    key = f"{images:032d}fake"
    (folder / key[:32]).mkdir(parents=True)
    shape = [images, 3, side, side]
    with open(folder / key[:32] / "images.u8", "wb") as f:
        f.truncate(int(np.prod(shape)))
    (folder / key[:32] / "meta.json").write_text(json.dumps({"key": key, "shape": shape, "files": images}))
    y = np.arange(images) % classes
    return MappedSet(str(folder), key, tuple(shape), np.arange(images), y, files=None)


def test_a_workers_memory_is_flat_in_the_size_of_the_cache(tmp_path):
    """RssAnon of a process that unpickles the data, builds the trainer (channel statistics,
    the sets, the model) and trains on 1 GB and on 10 GB of cached 224-px images: the same
    within 200 MB (reading the sets into memory would take the 10 GB)."""
    from ltsearch.data import LongTailData

    config = {**DIGITS, "model": {"arch": "vit_tiny_patch16_224",
                                  "options": {"img_size": 16, "patch_size": 8, "depth": 1,
                                              "embed_dim": 16, "num_heads": 1}},
              "train": {**DIGITS["train"], "threads": 1}}
    seen = {}
    for gib in (1, 10):
        n = gib * 2**30 // (3 * 224 * 224)
        whole = _fake_cache(tmp_path / f"cache{gib}", n)
        data = LongTailData([str(c) for c in range(100)], whole.take(np.arange(n - 400)),
                            whole.take(np.arange(n - 400, n - 200)), whole.take(np.arange(n - 200, n)),
                            np.bincount(whole.y[:n - 400], minlength=100).tolist())
        (tmp_path / f"data{gib}.pkl").write_bytes(pickle.dumps(data))
        code = WORKER.format(root=str(ROOT), data=str(tmp_path / f"data{gib}.pkl"), config=config, steps=20)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        seen[gib] = json.loads(out.stdout.splitlines()[-1])
    assert seen[10]["train"] > 9 * seen[1]["train"]
    assert abs(seen[10]["anon_mb"] - seen[1]["anon_mb"]) < 200, seen


FAULTS = """
import resource, sys
import ltsearch, torch
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(128, 3, 224, 224).fill_(1.0)  # a training batch at 224 px: 77 MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages on this kernel")
def test_importing_ltsearch_puts_large_tensors_on_huge_pages():
    """A new 77 MB batch faults in ~37 pages of 2 MB, not ~19,000 of 4 kB (ltsearch/__init__.py
    sets PyTorch's THP_MEM_ALLOC_ENABLE unless the user did); THP_MEM_ALLOC_ENABLE=0 keeps 4 kB."""
    def faults(**env):
        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        run = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                             check=True, env={**environ, **env})
        return int(run.stdout)

    assert faults() < 2_000
    if "[madvise]" in THP.read_text():  # (with "always", every large mapping has huge pages)
        assert faults(THP_MEM_ALLOC_ENABLE="0") > 15_000
