"""CIFAR-10-LT from the JPEG copy in ../shared/data (unpacked to a temporary folder)."""
import numpy as np
import pytest

from conftest import CIFAR_ARCHIVE
from ltsearch.runconfig import config_from_dict
from ltsearch.data import build_data
from ltsearch.data.archive import unpack
from ltsearch.trainer import Trainer

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"{CIFAR_ARCHIVE} is absent")]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return unpack(CIFAR_ARCHIVE, tmp_path_factory.mktemp("cifar"))


def test_cifar10_lt_one_epoch(cifar_root):
    cfg = config_from_dict({
        "data": {"source": "cifar10", "root": str(cifar_root), "imbalance_factor": 100,
                 "val_per_class": 0},
        "train": {"epochs": 1, "warmup_epochs": 1, "device": "cpu", "threads": 2},
    })
    data = build_data(cfg.data)
    assert len(data.train) == 12406
    assert data.counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(data.test) == 10000 and np.bincount(data.test.y).tolist() == [1000] * 10
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert data.train.x.shape[1:] == (3, 32, 32)
    # one epoch of the same profile at a twentieth of the size (n_max 250), the LDAM-DRW preset,
    # evaluated on the whole test set
    small = config_from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "max_per_class": 250},
                              "method": {"name": "ldam_drw"}})
    small_data = build_data(small.data)
    assert small_data.counts == [250, 149, 89, 53, 32, 19, 11, 6, 4, 2]
    result = Trainer(small, small_data).fit()
    assert result.status == "finished" and np.isfinite(result.metrics["train/loss"])
    assert sum(sum(row) for row in result.metrics["test/confusion"]) == 10000


def test_cifar10_validation_split_comes_first(cifar_root):
    cfg = config_from_dict({"data": {"source": "cifar10", "root": str(cifar_root),
                                     "imbalance_factor": 100, "val_per_class": 20}})
    data = build_data(cfg.data)
    # Only the head class runs short (5000 − 20); the tail subsets are LDAM-DRW's.
    assert data.counts == [4980, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert np.bincount(data.val.y).tolist() == [20] * 10
