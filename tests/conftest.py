import os

# The tests and every process they start (the CLI, `ray start`, `mlflow server`) inherit these:
# nothing the shell set may pick a cluster, an experiment or an auth mode for them. The suite
# runs on two workers (the README's command), so two-thread trainers share two cores: OpenMP
# threads that sleep while they wait rather than spin (spinning made some tests 7–19× slower).
os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
                  OMP_WAIT_POLICY="PASSIVE")
os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ltsearch.runconfig import config_from_dict  # noqa: E402
from ltsearch.data import build_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# digits-LT: IF=10 → 124 … 12 images per class; 2 epochs at batch 32 reach ≈0.8 balanced accuracy.
DIGITS = {
    "data": {"source": "digits", "imbalance_factor": 10, "val_per_class": 10,
             "augment": {"crop_pad": 0, "hflip": False}},
    "train": {"preset": "none", "epochs": 2, "batch_size": 32, "lr": 0.02, "warmup_epochs": 0,
              "schedule": "cosine", "device": "cpu", "threads": 2},
}


def make_config(method=None, **overrides):
    import copy

    d = copy.deepcopy(DIGITS)
    d["method"] = method or {"name": "ce"}
    for section, values in overrides.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return config_from_dict(d)


@pytest.fixture(scope="session")
def digits_data():
    return build_data(make_config().data)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (2 CPUs, no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens at (a dead server's address, or one to start at)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_search(**space):
    """A small digits-LT search file (3 epochs) over ``space['method']``."""
    return {
        "base": copy_base(),
        "search": {"num_samples": 6, "max_concurrent": 2, "resources": {"cpu": 1},
                   "asha": {"rungs": [0.33, 1.0], "reduction_factor": 2}, "seed": 0,
                   "report": False},  # seconds per search (importing scikit-learn's forests):
                                      # the tests of the report turn it on
        "space": space,
    }


def copy_base():
    import copy

    base = copy.deepcopy(DIGITS)
    base["train"]["epochs"] = 3
    del base["train"]["device"]
    return base


# The files that take minutes, first: the README's command hands out whole files in this order
# (`-n 2 --dist loadfile --no-loadscope-reorder`), so one worker is not left alone at the end
# with a long file while the other has nothing to do.
LONGEST_FIRST = ("test_resume_cluster.py", "test_folder_endings.py", "test_search.py", "test_report.py",
                 "test_cifar_slow.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
