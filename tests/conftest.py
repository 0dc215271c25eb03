import os
import signal
import time

# The tests and every process they start (the CLI, `ray start`, `mlflow server`) inherit these:
# nothing the shell set may pick a cluster, an experiment or an auth mode for them. The suite
# runs on two workers (the README's command), so two-thread trainers share two cores: OpenMP
# threads that sleep while they wait rather than spin (spinning made some tests 7–19× slower).
# The suite is CPU-bound, so two settings spare work nothing here uses: `mlflow server`'s job
# runner (eight processes, ~12 s of CPU a start), and the Ray workers a Ray starts before any
# task or actor asks for one (about a second of CPU each).
os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
                  HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                  RAY_prestart_worker_first_driver="0")
os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ltsearch.runconfig import config_from_dict  # noqa: E402
from ltsearch.data import build_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# digits-LT: IF=10 → 124 … 12 images per class. The CIFAR ResNet-8 (a third of a second per
# epoch here, 4.5× less than ResNet-32; the suite is CPU-bound): 3 epochs at batch 32 reach
# ≈0.75 balanced accuracy, its tail classes still weak (what the long-tail parts act on).
DIGITS = {
    "model": {"arch": "resnet8"},
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
def ray_local(tmp_path_factory):
    """One local Ray instance for the whole session (2 CPUs, no dashboard). Its workers load the
    hold hook (``session_hold``): this process does not, nor what the tests start."""
    import ray

    global SESSION_HOLD
    SESSION_HOLD = tmp_path_factory.mktemp("session-hold")
    hooked = Hold(SESSION_HOLD).env()
    with pytest.MonkeyPatch.context() as env:  # the raylet, and so every worker, inherits it
        for key in ("PYTHONPATH", "LTSEARCH_TEST_HOLD"):
            env.setenv(key, hooked[key])
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


SESSION_HOLD: Path | None = None


@pytest.fixture
def session_hold(ray_local) -> "Hold":
    """The hold folder of the session Ray's workers, emptied before and after the test (its
    trainers count from 0): for held trials of a search run in this process, or by a driver
    that joins the session's Ray (``ray_address``) instead of starting one (~10 s of CPU)."""
    hold = Hold(SESSION_HOLD)
    hold.clear()
    yield hold
    hold.clear()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session's Ray, for a driver a test starts that need not start a Ray of its own (a
    local Ray's processes cost ~10 s of CPU to start; the suite is CPU-bound)."""
    return ray_local.get_runtime_context().gcs_address


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens at (a dead server's address, or one to start at)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_search(**space):
    """A small digits-LT search file (3 epochs) over ``space['method']``, one trial at a time:
    each slot is a Ray worker process to start (~6 s of CPU: torch, Ray Tune), and the suite is
    CPU-bound; the tests of concurrency ask for more."""
    return {
        "base": copy_base(),
        "search": {"num_samples": 6, "max_concurrent": 1, "resources": {"cpu": 1},
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
LONGEST_FIRST = ("test_resume_cluster.py", "test_cluster_tracking.py", "test_folder_endings.py",
                 "test_prune_endings.py", "test_search.py", "test_report.py", "test_cifar_slow.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


_STORE_TEMPLATE: list[Path] = []


def fresh_store(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of an empty MLflow store at ``folder/name``, copied from one migrated once per
    test process (a fresh store's migrations cost ~3 s of CPU each). Tests of a store's very
    first creation make their own."""
    import atexit
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        from mlflow import MlflowClient

        where = Path(tempfile.mkdtemp(prefix="ltsearch-store-"))
        atexit.register(shutil.rmtree, where, True)
        MlflowClient(f"sqlite:///{where / 'mlflow.db'}").search_experiments()
        _STORE_TEMPLATE.append(where / "mlflow.db")
    Path(folder).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], Path(folder) / name)
    return f"sqlite:///{Path(folder) / name}"


HOLD_HOOK = ROOT / "tests" / "hold"


class Hold:
    """Pauses real trials at a named state (see ``tests/hold/sitecustomize.py``): ``env()`` for
    the processes a test starts, ``at(name)`` before they start, ``wait(name)`` until a trainer
    waits there, ``release(name)``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def env(self, base: dict | None = None) -> dict:
        base = dict(os.environ if base is None else base)
        path = os.pathsep.join(p for p in (str(HOLD_HOOK), base.get("PYTHONPATH")) if p)
        return dict(base, LTSEARCH_TEST_HOLD=str(self.folder), PYTHONPATH=path)

    def at(self, name: str) -> None:
        (self.folder / f"hold-{name}").touch()

    def reached(self, name: str) -> bool:
        return (self.folder / f"held-{name}").exists()

    def trainers(self) -> list[str]:
        """The Tune trial of each trainer built so far, by ordinal."""
        count = len(list(self.folder.glob("trainer-*")))
        return [(self.folder / f"trainer-{i}").read_text() for i in range(count)]

    def pid(self, name: str) -> int:
        """The process of the trainer held at ``name``."""
        return int((self.folder / f"held-{name}").read_text())

    def release(self, name: str) -> None:
        (self.folder / f"hold-{name}").unlink(missing_ok=True)

    def fault(self, name: str) -> None:
        """Arm a one-shot file: ``fail-<ordinal>-<epoch>`` (a trial's crash), ``die-<point>``."""
        (self.folder / name).touch()

    def fired(self, name: str) -> bool:
        return not (self.folder / name).exists()

    def clear(self) -> None:
        """No holds, faults or trainers counted (held trainers must have been let go or killed)."""
        for path in self.folder.iterdir():
            path.unlink()

    def kill(self, name: str) -> None:
        """SIGKILL the trainer held at ``name`` and wait until it is gone: a held trial of a
        driver that joined a Ray outlives the driver until Ray reaps it, and let go it would
        go on writing into the search's folder."""
        pid = self.pid(name)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # reaped already
        deadline = time.monotonic() + 30
        while _state(pid) != "Z":  # gone, or a zombie its parent has yet to reap
            assert time.monotonic() < deadline, f"trainer {pid} still alive"
            time.sleep(0.05)


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command's name (state, ppid, pgid, …); none for a
    process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return []


def _state(pid: int) -> str:
    return (proc_stat(pid) or ["Z"])[0]


def write_list_dataset(folder: Path, per_class=(24, 12, 6, 4), test_per_class=4, seed=0) -> dict:
    """PNG and JPEG images of mixed sizes and a ``path label`` split file per split: a list
    source's ``data`` section (long-tailed as written: ``profile: none``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = {"train": [], "test": []}
    for split, counts in (("train", per_class), ("test", [test_per_class] * len(per_class))):
        for c, n in enumerate(counts):
            for i in range(n):
                rel = f"{split}/c{c}/{i}.{'png' if i % 2 else 'jpg'}"
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                h, w = (int(v) for v in rng.integers(10, 25, 2))
                base = np.full((h, w, 3), 40 * c, np.uint8)  # a class's colour, plus noise
                image = np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / rel, quality=95)
                lines[split].append(f"{rel} {c}")
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return {"source": "list", "root": str(folder), "train": "train.txt", "test": "test.txt",
            "profile": "none", "val_per_class": 1, "image_size": 12}
