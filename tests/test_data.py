import numpy as np
import pytest
from PIL import Image

from ltsearch.runconfig import config_from_dict
from ltsearch.data import DataError, build_data, class_counts, select_longtail
from ltsearch.data.sources import load_image_folder_pools


def test_cifar_lt_counts_match_published_totals():
    c10 = class_counts("exp", 5000, 10, 100)
    assert sum(c10) == 12406 and c10[0] == 5000 and c10[-1] == 50
    c100 = class_counts("exp", 500, 100, 100)
    assert sum(c100) == 10847 and c100[0] == 500 and c100[-1] == 5
    # n_i = int(n_max · IF^(−i/(C−1)))
    assert c10[3] == int(5000 * 0.01 ** (3 / 9))


def test_step_profile_and_balanced():
    assert class_counts("step", 100, 10, 10) == [100] * 5 + [10] * 5
    assert class_counts("step", 100, 10, 10, step_minor_fraction=0.3) == [100] * 7 + [10] * 3
    assert class_counts("none", 7, 3, 50) == [7, 7, 7]
    with pytest.raises(DataError, match="imbalance factor"):
        class_counts("exp", 100, 10, 0.5)


def test_selection_reproduces_ldam_drw():
    """LDAM-DRW: np.random.seed(0); per class in label order shuffle its indices, keep first n."""
    labels = np.repeat(np.arange(4), 50)
    counts = [50, 20, 8, 3]
    np.random.seed(0)
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected.append(idx[:n])
    train, val = select_longtail(labels, counts, val_per_class=0, seed=0)
    np.testing.assert_array_equal(train, np.concatenate(expected))
    assert len(val) == 0
    # A validation split comes from the end of each shuffled order: tail subsets are unchanged.
    train_v, val_v = select_longtail(labels, counts, val_per_class=5, seed=0)
    assert set(train_v[len(train_v) - 31:]) == set(np.concatenate(expected[1:]))
    assert len(set(train_v) & set(val_v)) == 0
    assert np.bincount(labels[val_v]).tolist() == [5, 5, 5, 5]


def test_digits_longtail(digits_data):
    d = digits_data
    assert d.counts == sorted(d.counts, reverse=True)
    assert d.counts[0] / d.counts[-1] == pytest.approx(10, rel=0.15)
    assert np.bincount(d.val.y).tolist() == [10] * 10
    assert np.bincount(d.test.y).tolist() == [40] * 10
    assert d.train.x.dtype == np.uint8 and d.train.x.shape[1:] == (1, 8, 8)


def _write_tree(root, classes=("cat", "dog"), per_class=(6, 3), size=8, corrupt=None):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, n in zip(classes, per_class):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i:03d}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"not an image at all")


def test_digits_read_without_importing_scikit_learn_equal_load_digits():
    """The driver reads the digits CSV directly (scikit-learn's import costs ~4 s): same
    images, same labels, and scikit-learn left unimported."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ltsearch.data.sources import digits_arrays

    images, target = digits_arrays()
    d = load_digits()
    np.testing.assert_array_equal(images, d.images)
    np.testing.assert_array_equal(target, d.target)
    code = ("import sys; from ltsearch.data.sources import load_digits_pools; "
            "load_digits_pools(40); print('sklearn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_image_folder_tree(tmp_path):
    _write_tree(tmp_path)
    pools = load_image_folder_pools(tmp_path)
    assert pools.classes == ["cat", "dog"]
    cfg = config_from_dict({"data": {"source": "imagefolder", "root": str(tmp_path),
                                     "imbalance_factor": 2, "val_per_class": 1}})
    data = build_data(cfg.data)
    assert data.counts == [5, 2] and len(data.val) == 2 and len(data.test) == 9
    assert data.train.x.shape[1:] == (3, 8, 8)


def test_image_folder_corrupt_file_is_named(tmp_path):
    _write_tree(tmp_path, corrupt="test/dog/001.png")
    cfg = config_from_dict({"data": {"source": "imagefolder", "root": str(tmp_path)}})
    with pytest.raises(DataError, match=r"dog/001\.png"):
        build_data(cfg.data)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        build_data(config_from_dict({"data": {"source": "imagefolder",
                                              "root": str(tmp_path / "nope")}}).data)
    _write_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty class folder: .*train/empty"):
        build_data(config_from_dict({"data": {"source": "imagefolder", "root": str(tmp_path)}}).data)


def test_mixed_sizes_need_image_size(tmp_path):
    _write_tree(tmp_path)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "train" / "cat" / "big.png")
    data = {"source": "imagefolder", "root": str(tmp_path), "val_per_class": 1, "profile": "none"}
    with pytest.raises(DataError, match=r"big\.png.*data.image_size"):
        build_data(config_from_dict({"data": data}).data)
    cfg = config_from_dict({"data": {**data, "image_size": 8}})
    assert build_data(cfg.data).train.x.shape[2:] == (8, 8)


def test_cifar_missing_root(tmp_path):
    cfg = config_from_dict({"data": {"source": "cifar10", "root": str(tmp_path)}})
    with pytest.raises(DataError, match="cifar10"):
        build_data(cfg.data)


def test_torchvision_cifar10_files(tmp_path):
    """The python-pickle files torchvision's CIFAR10(root) reads, written small here."""
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(10)]
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in names]}, fh)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = [c for c in range(10) for _ in range(4)]
        with open(base / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 255, (40, 3072), dtype=np.uint8),
                         b"labels": labels}, fh)
    cfg = config_from_dict({"data": {"source": "cifar10", "root": str(tmp_path),
                                     "imbalance_factor": 4, "val_per_class": 2}})
    data = build_data(cfg.data)
    assert data.classes == names and len(data.test) == 40
    # 20 images per class in the pool, n_max = 20, IF 4: int(20·4^(−i/9)), capped at 18 (val 2)
    assert data.counts == [min(18, int(20 * 0.25 ** (i / 9))) for i in range(10)]
    assert data.train.x.shape[1:] == (3, 32, 32)


def test_read_only_arrays_from_rays_object_store_are_shared_without_a_warning(digits_data):
    """A trial worker gets the data from Ray's object store as read-only arrays shared by every
    worker on the node: the trainer reads them in place (no copy per worker) and PyTorch's
    "not writable" warning, meant for tensors that get written, is not raised."""
    import warnings

    import torch

    from ltsearch.data.device import DeviceImages, channel_stats
    from ltsearch.data.sources import ImageSet

    def frozen(s):
        x, y = s.x.copy(), s.y.copy()
        x.setflags(write=False)
        y.setflags(write=False)
        return ImageSet(x, y)

    train = frozen(digits_data.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = channel_stats(train)
        images = DeviceImages(train, torch.device("cpu"), mean, std)
    assert images.x.data_ptr() == train.x.ctypes.data and images.y.data_ptr() == train.y.ctypes.data
    assert torch.allclose(mean, torch.as_tensor(digits_data.train.x / 255.0).mean(dim=(0, 2, 3)).float())
    x, y = images.batch(torch.arange(4), augment=False)  # batches are fresh tensors
    assert x.shape[0] == 4 and torch.equal(y, torch.as_tensor(digits_data.train.y[:4]))


def _archive(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("system_tar", [True, False], ids=["system tar", "tarfile"])
def test_unpacking_an_archive_with_either_tool(tmp_path, monkeypatch, system_tar):
    """The system's tar where there is one (about 20× faster on CIFAR-10's 60,000 files), else
    Python's tarfile: the same files; an archive with a member that would land outside the
    folder is refused, and nothing of it is left in the folder."""
    import shutil

    from ltsearch.data.archive import unpack, unpacked

    if not system_tar:
        monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without tar
    elif shutil.which("tar") is None:
        pytest.skip("no tar on this machine")
    good = _archive(tmp_path / "good.tar.gz", [("set/train/a/0000.jpg", b"\xff\xd8one"),
                                               ("set/test/b/0001.jpg", b"two")])
    assert unpack(good, tmp_path / "out") == tmp_path / "out"
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["set/test/b/0001.jpg", "set/train/a/0000.jpg"]
    assert (tmp_path / "out" / "set/train/a/0000.jpg").read_bytes() == b"\xff\xd8one"
    (tmp_path / "out" / "set/train/a/0000.jpg").write_bytes(b"kept")  # there: not unpacked again
    assert unpacked(good, tmp_path / "out", "set") == tmp_path / "out"
    assert (tmp_path / "out" / "set/train/a/0000.jpg").read_bytes() == b"kept"
    assert (unpacked(good, tmp_path / "fresh", "set") / "set/test/b/0001.jpg").read_bytes() == b"two"
    bad = _archive(tmp_path / "bad.tar.gz", [("ok.txt", b"x"), ("../escaped.txt", b"bad")])
    with pytest.raises(Exception, match="escaped.txt|outside"):
        unpack(bad, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists() and list((tmp_path / "out2").iterdir()) == []


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    import torch

    from ltsearch.data.device import random_crop

    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # offsets drawn per image (25 possible)
    assert torch.equal(random_crop(x, 2, torch.Generator().manual_seed(0)), out)


def test_flip_takes_about_half_the_images_mirrored(digits_data):
    import torch

    from ltsearch.data.device import DeviceImages, channel_stats

    mean, std = channel_stats(digits_data.train)
    plain = DeviceImages(digits_data.train, torch.device("cpu"), mean, std)
    flipping = DeviceImages(digits_data.train, torch.device("cpu"), mean, std, hflip=True)
    idx = torch.arange(len(plain))
    x, _ = plain.batch(idx)
    f, y = flipping.batch(idx, torch.Generator().manual_seed(0))
    same = [torch.equal(f[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(f[i], x[i].flip(2)) for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored))
    symmetric = sum(s and m for s, m in zip(same, mirrored))
    n = len(x) - symmetric
    share = (sum(mirrored) - symmetric) / n
    assert abs(share - 0.5) <= 5 * (0.25 / n) ** 0.5  # 5 σ of a fair coin over n images
    assert torch.equal(flipping.batch(idx, augment=False)[0], x)  # evaluation: never flipped
