"""Every check a search, a resume or a confirmation passes before anything is written or Ray
starts: the cluster to join, the machine's resources, a resumed folder's files and settings,
the tracking store and the data. Bad input is one :class:`ConfigError` (exit 2, one line).
:func:`check_search` opens the folder (:class:`ltsearch.search.opened.Search`), its lock held.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Optional

from ltsearch.config import ConfigError, writable_folder
from ltsearch.runconfig import config_from_dict
from ltsearch.search.opened import RAY_SUBDIR, Search
from ltsearch.search.records import ONGOING, TrialRecords

log = logging.getLogger(__name__)


def resolve_address(address: Optional[str]) -> Optional[str]:
    """The cluster a search joins, as ``ray.init`` picks it, checked to answer before Ray is
    asked to join it (Ray retries an address nothing listens at for ever); None for a fresh local
    Ray. Left out or ``auto``, RAY_ADDRESS wins (`ray job submit` sets it); ``auto`` is then the
    cluster `ray start` recorded on this machine. Unlike Ray, ``auto`` never joins an unrecorded
    instance found among the processes: another driver's private Ray is not a cluster."""
    key, said, local = "--address", "", "leave --address out for a local Ray"
    if os.environ.get("RAY_ADDRESS") and address in (None, "auto"):
        key, address = "RAY_ADDRESS", os.environ["RAY_ADDRESS"]
        local = "unset RAY_ADDRESS or pass --address local for a local Ray"
    if address in (None, "local"):
        return None
    if address == "auto":
        from ltsearch.search.ray_private import recorded_cluster

        address, folder = recorded_cluster()
        if not address:
            raise ConfigError(key, f"auto: no cluster was started with `ray start` on this machine "
                                   f"(none recorded in {folder}); start one with `ray start "
                                   f"--head`, or {local}")
        said = f"auto: the cluster `ray start` recorded in {folder}; "
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(key, f"must be HOST:PORT, ray://HOST:PORT, auto or local, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(key, f"no Ray cluster answers at {address} ({said}{e.strerror or e}); "
                               f"start one with `ray start --head`, or {local}") from None
    return address


# Tune's restored experiment keeps its count of trials and its concurrency limiter's state
FIXED_ON_RESUME = {"num_samples": "--num-samples", "max_concurrent": "--max-concurrent"}


def stored_settings(folder: Path):
    """The search settings a search folder ran with (its search.yaml's ``search`` section, not
    the space: no combination checks), None if it has none."""
    from ltsearch.config import from_dict, read_yaml
    from ltsearch.search.settings import SearchSettings

    path = Path(folder) / "search.yaml"
    if not path.is_file():
        return None
    return from_dict(SearchSettings, (read_yaml(path) or {}).get("search") or {}, "search")


def check_fixed_on_resume(space, folder: Path) -> None:
    """A resumed search runs the trials it was started with, so many at a time."""
    stored = stored_settings(folder)
    for key, flag in FIXED_ON_RESUME.items():
        have, asked = getattr(stored, key, None), getattr(space.settings, key)
        if have is not None and have != asked:
            raise ConfigError(flag, f"{asked}, but the search in {folder} runs {count(have, 'trial')}"
                                    f"{' at a time' if key == 'max_concurrent' else ''} (Ray Tune "
                                    "resumes it as it was started); for another count, start another "
                                    "search with --name")


# What a resumed search may change: what happens after or beside its trials (confirmation, asked
# for per command; tracking, e.g. without a store that is gone; the report page). Everything
# else decides what its trials ran, and the folder records it.
CHANGEABLE_ON_RESUME = ("search.confirm", "search.tracking", "search.background_tracking",
                        "search.report")


def check_resumable(space, folder: Path, name: str) -> TrialRecords:
    """A search folder a resume or a confirmation continues: its files readable (each damaged
    one named), and the search file the one it ran with; its records, read."""
    from ltsearch.config import read_yaml
    from ltsearch.search.folder import check_checkpoint, check_study, read_json
    from ltsearch.search.results import read_info
    from ltsearch.search.trial import CHECKPOINT_FILE, RUNG_FILE, holds_state

    records = TrialRecords(folder)
    read_info(folder)
    check_study(folder / "optuna.db", name)
    stored_path = folder / "search.yaml"
    stored = read_yaml(stored_path)
    if not isinstance(stored, dict):
        from ltsearch.search.folder import damaged

        raise damaged(stored_path, "not a search file")
    have, asked = _as_run(stored, stored_path), _as_run(space.source, stored_path)
    differ = sorted(k for k in set(have) | set(asked) if have.get(k, None) != asked.get(k, None)
                    and not k.startswith(CHANGEABLE_ON_RESUME))
    if differ:
        shown = ", ".join(f"{k} ({have.get(k, '—')!r} → {asked.get(k, '—')!r})" for k in differ[:6])
        raise ConfigError("--resume", f"the search file differs from the one the search in {folder} "
                                      f"ran with ({stored_path}): {shown}"
                                      f"{f' and {len(differ) - 6} more' if len(differ) > 6 else ''}; "
                                      "resume with that file, or start another search with --name")
    snapshots = sorted((folder / RAY_SUBDIR).glob("experiment_state-*.json"))
    if snapshots:  # Tune writes it in place: a full disk can leave it cut short
        read_json(snapshots[-1])
    for trial_id, r in records.trials.items():
        if r["status"] in ONGOING:
            for checkpoint in latest_checkpoints(folder, trial_id):
                check_checkpoint(checkpoint, (RUNG_FILE,))
                if holds_state(read_json(checkpoint / RUNG_FILE)):
                    check_checkpoint(checkpoint, (CHECKPOINT_FILE,))
    return records


def _as_run(source: dict, path: Path) -> dict:
    """A search file as what it runs, flat: its base and settings with their defaults filled in
    (a key left out and the same key at its default are the same search), its space as written."""
    import dataclasses

    from ltsearch.config import from_dict
    from ltsearch.search.records import flatten
    from ltsearch.search.settings import SearchSettings

    try:
        base = dataclasses.asdict(config_from_dict(source.get("base") or {}))
        settings = dataclasses.asdict(from_dict(SearchSettings, source.get("search") or {}, "search"))
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} (in {path})") from None
    return flatten({"base": base, "search": settings, "space": source.get("space") or {}})


def latest_checkpoints(folder: Path, trial_id: str) -> list[Path]:
    """The newest checkpoint of a trial in each Tune experiment of the folder (the one a
    resume restores)."""
    from ltsearch.search.results import CONFIRM_PREFIX

    found = []
    for experiment in [folder / RAY_SUBDIR, *sorted(folder.glob(f"{CONFIRM_PREFIX}*"))]:
        for trial_dir in experiment.glob(f"*_{trial_id}_*"):
            checkpoints = sorted(trial_dir.glob("checkpoint_*"))
            if checkpoints:
                found.append(checkpoints[-1])
    return found


def check_machine_holds(resources) -> None:
    """A local Ray has this machine's CPUs and GPUs, and no node will join it: a trial asking
    for more would wait, PENDING, for ever."""
    import torch

    for kind, asked, have in (("cpu", resources.cpu, os.cpu_count() or 1),
                              ("gpu", resources.gpu, torch.cuda.device_count())):
        if asked > have:
            raise ConfigError(f"search.resources.{kind}", f"asks for {count(asked, kind.upper())} "
                              f"per trial; this machine has {have} (without "
                              f"--address the search starts a local Ray on it): ask for fewer, or "
                              f"join a cluster that has them with --address")


def count(n: float, what: str) -> str:
    return f"{n:g} {what}{'s' * (n != 1)}"


def nodes_for(resources) -> int:
    """How many of the running Ray's live nodes could hold one trial."""
    import ray

    asked = {"CPU": resources.cpu, "GPU": resources.gpu}
    return sum(node["Alive"] and all(node["Resources"].get(k, 0) >= v for k, v in asked.items())
               for node in ray.nodes())


def check_search(space, name: str, storage, tracking_uri: Optional[str], resume: bool,
                 confirm_only: bool = False) -> Search:
    """Every check that needs no run: the folder (taking its lock: one writer at a time), the
    tracking store, the data (the search file itself was checked when it was read). Writes
    nothing but the lock, which a refusal takes away again."""
    from ltsearch.search.folder import FolderLock

    writable_folder(Path(storage), "--storage")
    folder = (Path(storage) / name).resolve()
    lock = FolderLock(folder, "search_dir" if confirm_only else "--name").acquire()
    try:
        search = _check_locked(space, name, folder, tracking_uri, resume)
    except BaseException:
        lock.release(refused=True)
        raise
    search.lock = lock
    return search


def _check_locked(space, name: str, folder: Path, tracking_uri: Optional[str], resume: bool) -> Search:
    from ltsearch.data import build_data
    from ltsearch.metrics import describe_groups, shot_groups
    from ltsearch.models import check_model, identity
    from ltsearch.search.tracker import make_tracker

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local Ray prestarts a plain worker per CPU for the first driver; Tune's trial actors
    # carry a runtime_env (its env_vars) and never use them, so they only take CPU from the
    # trial workers starting beside them.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot often: cheap, resumes more
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Our files (trials.json, optuna.db, best_config.yaml…) live in ``folder``; Ray's experiment
    # in ``folder/ray``, which Tune syncs from its own staging copy (it would overwrite ours).
    if resume and not (folder / RAY_SUBDIR / "tuner.pkl").is_file():
        raise ConfigError("--resume", f"no search to resume at {folder}")
    records = None
    if resume:
        check_fixed_on_resume(space, folder)
        records = check_resumable(space, folder, name)
    if not resume and (folder / RAY_SUBDIR / "tuner.pkl").exists():
        raise ConfigError("--name", f"a search named {name!r} exists in {folder.parent}; "
                                    "pass --resume to continue it or choose another --name")
    settings = space.settings
    base = config_from_dict(space.base)
    check_model(base.model, "base.model")  # its weights file read once, as a trial will
    data = build_data(base.data)  # once, on the driver
    space.check_counts(data.counts)
    m = base.train.metrics
    split = (m.many_threshold, m.few_threshold, m.groups)
    groups = describe_groups(data.counts, *split)
    empty = [g for g, classes in shot_groups(data.counts, *split).items() if not classes]
    if empty:
        log.warning("%s: %s empty on this data; `train: {metrics: {groups: thirds}}` splits the "
                    "classes by training count", groups, " and ".join(empty))
    tracker = make_tracker(settings.tracking, tracking_uri, settings.experiment or "ltsearch",
                           data.classes, data.counts, background=settings.background_tracking)
    return Search(space, name, folder, resume, data, tracker, groups, records=records,
                  backbone=identity(base.model))
