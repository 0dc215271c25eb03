"""``ltsearch search``: Ray Tune + Optuna (define-by-run TPE) + ASHA, tracked in MLflow.

Stages, each a function: check everything (the search file when read; then the folder, the
tracking store and the data, writing nothing — bad input exits 2 before Ray starts), prepare the
folder and the MLflow runs, execute (Ray Tune with Optuna and ASHA, the data in the object store
once), and finish — always, after an interrupt or an error too — closing every record in
agreement and writing the leaderboard and ``best_config.yaml``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ltsearch.config import ConfigError, writable_folder
from ltsearch.runconfig import config_from_dict
from ltsearch.search.records import CONFIRM_OF, ONGOING
from ltsearch.search.signals import StopSignals, spared_children
from ltsearch.search.tracker import TrackingError

log = logging.getLogger(__name__)

RAY_SUBDIR = "ray"
COMPILE_CACHE = "compile_cache"  # torch inductor's, shared by the search's compiled trials




@dataclass
class SearchOutcome:
    folder: Path
    records: "object"
    best_config: Optional[Path]
    leaderboard: str
    parent_run_id: str
    tracking_uri: str
    ending: str = "finished"  # finished | interrupted | failed
    tracking: str = ""  # where to look: one line
    report: Optional[Path] = None  # report.html
    signal: Optional[int] = None  # the stop signal that ended it (SIGINT, SIGTERM, SIGHUP), if any
    unclosed: list = field(default_factory=list)  # records the ending could not write (a full disk)


class SearchStopped(Exception):
    """The search ended before its last trial (Ctrl-C, or an error in the driver); everything
    recorded is closed and ``--resume`` continues it."""

    def __init__(self, outcome: SearchOutcome, cause: Optional[BaseException] = None):
        self.outcome = outcome
        self.cause = cause
        super().__init__(outcome.ending)


@dataclass
class Search:
    """A checked search, ready to run: what every stage needs."""
    space: object
    name: str
    folder: Path
    resume: bool
    data: object
    tracker: object  # a search.tracker.Tracker
    groups: str  # which many/medium/few split the metrics use, in words
    tune_trial_ids: set = field(default_factory=set)  # trials Tune recorded, after fit
    began: float = field(default_factory=time.monotonic)  # the command's start, for the clock
    lock: Optional[object] = None  # the folder's writer lock (search.folder.FolderLock), held throughout
    stops: Optional[object] = None  # search.signals.StopSignals: SIGTERM and SIGHUP as Ctrl-C

    @property
    def ray_dir(self) -> Path:
        return self.folder / RAY_SUBDIR

    @property
    def study_uri(self) -> str:
        return f"sqlite:///{self.folder / 'optuna.db'}"


def cover_order(methods: list[str], seed: int) -> list[str]:
    """The order the first trials cover the methods in: shuffled by the search seed (in the
    file's order the same methods would always start first, against the emptiest rungs)."""
    import random

    order = list(methods)
    random.Random(seed).shuffle(order)
    return order


def _first_points(space) -> list[dict] | None:
    """One enqueued trial per method (its other parameters sampled), so none goes untried."""
    methods = list(space.methods)
    if not space.settings.cover_methods or len(methods) < 2 or space.settings.num_samples < len(methods):
        return None
    return [{"method": m} for m in cover_order(methods, space.settings.seed)]


def make_scheduler(settings, records: Optional[dict] = None):
    """Successive halving over complete runs when a trial has rungs before its full run
    (:mod:`ltsearch.search.rungs`), else none; a resumed search's rebuilt from its records."""
    from ray.tune.schedulers import FIFOScheduler

    from ltsearch.search.scheduler import RungScheduler

    if len(settings.asha.fractions()) < 2:
        return FIFOScheduler()
    scheduler = RungScheduler(settings.asha.reduction_factor, settings.mode)
    scheduler.restore_records(records or {})
    return scheduler


def search_name(path: str | Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)


def run_search(space, *, name: str, storage: str | Path = "searches", address: Optional[str] = None,
               tracking_uri: Optional[str] = None, resume: bool = False,
               verbose: int = 0, confirm_only: bool = False,
               began: Optional[float] = None) -> SearchOutcome:
    """Check everything, prepare the folder and tracking, run, and always finish: whatever the
    ending, trials.json, the Optuna study and MLflow agree and nothing stays RUNNING. Raises
    :class:`SearchStopped` after an interrupt or a driver error (the search is resumable).
    ``verbose``: 0 a line per trial event and a progress bar; 1 Tune's tables too; 2 Ray's own
    log records too. ``confirm_only``: a finished search's confirmation runs (``ltsearch confirm``).
    ``began``: when the command started (``time.monotonic``), for the progress line's clock."""
    address = resolve_address(address)
    if address is None:
        check_machine_holds(space.settings.resources)
    stops = StopSignals()
    if threading.current_thread() is threading.main_thread():
        stops.install()
    try:
        search = check_search(space, name, storage, tracking_uri, resume or confirm_only, confirm_only)
        search.stops = stops
        try:
            return _run_checked(search, address, verbose, confirm_only, began)
        finally:
            search.lock.release()
    finally:
        stops.restore()


def _run_checked(search: Search, address: Optional[str], verbose: int, confirm_only: bool,
                 began: Optional[float]) -> SearchOutcome:
    if began is not None:
        search.began = began
    if confirm_only:
        _check_finished(search)
    prepare_search(search)
    if not _work_left(search, confirm_only):
        settings = search.space.settings
        if confirm_only:
            done = f"confirming {confirming(settings.confirm.top, settings.confirm.seeds)}: every run has ended"
        else:
            done = f"its {settings.num_samples} trials have all ended"
        print(f"search {search.name}: {done}, in {search.folder}: nothing to "
              f"{'run' if confirm_only else 'resume'}", flush=True)
        return finish_search(search, "finished")
    say_starting(search, address, confirm_only)
    ending, cause = "failed", None
    try:
        ending = execute_search(search, address, verbose, confirm_only)
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before Tune's handler is set
        ending, cause = "interrupted", e
    except Exception as e:
        ending, cause = "failed", _own_cause(e)
    finally:
        with search.stops.closing_records():
            outcome = finish_search(search, ending, cause)
    if ending != "finished":
        raise SearchStopped(outcome, cause)
    return outcome


def _own_cause(e: Exception) -> Exception:
    """Tune wraps what our callbacks raise in a TuneError whose message is the whole
    traceback; a lost tracking store (a TrackingError, one line by design) and a disk that
    failed (an OSError: full, gone) are shown as themselves, and so is whatever else a
    TuneError wraps (the first exception of its chain)."""
    if isinstance(e.__context__, TrackingError):
        return e.__context__
    chain, seen = [], e
    while seen is not None and seen not in chain:
        if isinstance(seen, OSError):
            return seen
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    log.debug("the search stopped", exc_info=e)  # the whole traceback, for debug logging
    return chain[-1] if type(e).__name__ == "TuneError" else e


def _work_left(search: Search, confirm_only: bool) -> bool:
    """Whether a search has anything for Ray to do: a fresh one, or a resumed one with trials
    not yet run or not ended, or confirmation runs missing (all that ``ltsearch confirm``
    looks for: it runs on finished searches)."""
    if not confirm_only and (not search.resume or _trials_left(search)):
        return True
    if search.space.settings.confirm.top:
        from ltsearch.search.confirm import confirmation_left

        return confirmation_left(search)
    return False


def confirming(top: int, seeds: int) -> str:
    """What confirmation re-trains, in words."""
    return (f"{'the best config' if top == 1 else f'the {top} best configs'} with {seeds} fresh "
            f"seed{'s' if seeds > 1 else ''}{' each' if top > 1 else ''}")


def say_starting(search: Search, address: Optional[str], confirm_only: bool) -> None:
    """One line once the checks have passed, before the seconds Ray takes to start: what runs,
    where its results go, which Ray."""
    import ray

    from ltsearch.search.records import TrialRecords

    settings = search.space.settings
    top, seeds = settings.confirm.top, settings.confirm.seeds
    methods = len(search.space.methods)
    if confirm_only:
        what = "confirmation runs"
    else:
        what = f"{_count(settings.num_samples, 'trial')} over {_count(methods, 'method')}"
        if search.resume:
            ended = sum(r["status"] not in ONGOING for r in
                        TrialRecords(search.folder).trials.values() if not r.get(CONFIRM_OF))
            what = f"resuming {what} ({ended} ended)"
        if top:
            what += f", then {confirming(top, seeds)}"
    where = ("on the Ray already running" if ray.is_initialized()
             else f"joining the Ray cluster at {address}" if address else "starting a local Ray")
    print(f"search {search.name}: {what}, {settings.max_concurrent} at a time, in {search.folder}; "
          f"{where}", flush=True)


def _trials_left(search: Search) -> bool:
    """Whether some of the search's trials (not its confirmation runs) have not run or ended."""
    from ltsearch.search.records import TrialRecords

    trials = [r for r in TrialRecords(search.folder).trials.values() if not r.get(CONFIRM_OF)]
    return len(trials) < search.space.settings.num_samples or any(
        r["status"] in ONGOING for r in trials)


def _check_finished(search: Search) -> None:
    if _trials_left(search):
        raise ConfigError("search_dir", f"the search in {search.folder} has not finished: continue "
                                        "it with `ltsearch search FILE --resume` first")


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
    from ltsearch.search.space import SearchSettings

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
            raise ConfigError(flag, f"{asked}, but the search in {folder} runs {_count(have, 'trial')}"
                                    f"{' at a time' if key == 'max_concurrent' else ''} (Ray Tune "
                                    "resumes it as it was started); for another count, start another "
                                    "search with --name")


# What a resumed search may change: what happens after or beside its trials (confirmation, asked
# for per command; tracking, e.g. without a store that is gone; the report page). Everything
# else decides what its trials ran, and the folder records it.
CHANGEABLE_ON_RESUME = ("search.confirm", "search.tracking", "search.background_tracking",
                        "search.report")


def check_resumable(space, folder: Path, name: str) -> None:
    """A search folder a resume or a confirmation continues: its files readable (each damaged
    one named), and the search file the one it ran with."""
    from ltsearch.config import read_yaml
    from ltsearch.search.folder import check_checkpoint, check_study, read_json
    from ltsearch.search.records import TrialRecords
    from ltsearch.search.results import read_info
    from ltsearch.search.trial import CHECKPOINT_FILE, RUNG_FILE

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
                check_checkpoint(checkpoint, (CHECKPOINT_FILE, RUNG_FILE))


def _as_run(source: dict, path: Path) -> dict:
    """A search file as what it runs, flat: its base and settings with their defaults filled in
    (a key left out and the same key at its default are the same search), its space as written."""
    import dataclasses

    from ltsearch.config import from_dict
    from ltsearch.search.records import flatten
    from ltsearch.search.space import SearchSettings

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
            raise ConfigError(f"search.resources.{kind}", f"asks for {_count(asked, kind.upper())} "
                              f"per trial; this machine has {have} (without "
                              f"--address the search starts a local Ray on it): ask for fewer, or "
                              f"join a cluster that has them with --address")


def _count(n: float, what: str) -> str:
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
    if resume:
        check_fixed_on_resume(space, folder)
        check_resumable(space, folder, name)
    if not resume and (folder / RAY_SUBDIR / "tuner.pkl").exists():
        raise ConfigError("--name", f"a search named {name!r} exists in {folder.parent}; "
                                    "pass --resume to continue it or choose another --name")
    settings = space.settings
    base = config_from_dict(space.base)
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
    return Search(space, name, folder, resume, data, tracker, groups)


def _catch_up_tracker(search: Search) -> None:
    """On a resume, trials that ended in the records but whose tracker calls were lost (a
    killed driver, a lost tracking server) are recorded again from Ray's per-epoch results."""
    from ltsearch.recipes import reported_metrics
    from ltsearch.search.callbacks import tracked_metrics, tracker_tags
    from ltsearch.search.records import TrialRecords
    from ltsearch.search.results import read_reports

    part_metrics = reported_metrics()
    all_reports = read_reports(search.folder)
    for trial_id, r in TrialRecords(search.folder).trials.items():
        if r["status"] not in ("COMPLETED", "PRUNED", "FAILED"):
            continue  # resumed by Tune, or closed as LOST by the tracker's end
        reports = [{"epoch": x.get("epoch", 0), "result": x, "metrics": tracked_metrics(x, part_metrics)}
                   for x in all_reports.get(trial_id, [])]
        search.tracker.catch_up(trial_id, r["method"], r["config"], r["status"], reports, r.get("error"),
                                tracker_tags(r))


def prepare_search(search: Search) -> None:
    """The search folder and the tracker's search record (reopened on resume, and brought up
    to date with the records)."""
    search.folder.mkdir(parents=True, exist_ok=True)
    (search.folder / "search.yaml").write_text(_dump(search.space.source))
    settings = search.space.settings
    write_info(search)
    search.tracker.start_search(search.folder, search.name, {
        "search.metric": settings.metric, "search.mode": settings.mode,
        "search.num_samples": settings.num_samples, "search.seed": settings.seed,
        "search.max_concurrent": settings.max_concurrent,
        "search.methods": ",".join(search.space.methods), "data": search.data.summary()})
    if search.resume:
        _catch_up_tracker(search)


def write_info(search: Search) -> None:
    """What readers of the folder need and could not rebuild without the data or the command
    line: the class counts, the shot split in words, where the search is tracked."""
    import json

    from ltsearch.search.results import SEARCH_INFO

    data = search.data
    (search.folder / SEARCH_INFO).write_text(json.dumps({
        "name": search.name, "data": data.summary(), "classes": list(data.classes),
        "counts": [int(n) for n in data.counts], "groups": search.groups,
        "tracking": search.space.settings.tracking, "tracking_uri": search.tracker.uri,
        "experiment": search.space.settings.experiment or "ltsearch"}, indent=1))


RAY_LOG = "ray.log"


@contextlib.contextmanager
def ray_messages_to(path: Path, verbose: int):
    """Ray's own log records (warnings about its bookkeeping on a resume, its tracebacks) go to
    ``path``, not to the user's terminal; ``-v -v`` shows them."""
    ray_logger = logging.getLogger("ray")
    if verbose > 1:
        yield
        return
    handler = logging.FileHandler(path)
    handler.handleError = lambda record: None  # a full disk: Ray's records are dropped, quietly
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = ray_logger.handlers[:]
    for h in saved:
        ray_logger.removeHandler(h)
    ray_logger.addHandler(handler)
    try:
        yield
    finally:
        ray_logger.removeHandler(handler)
        handler.close()
        for h in saved:
            ray_logger.addHandler(h)


def execute_search(search: Search, address: Optional[str], verbose: int,
                   confirm_only: bool = False) -> str:
    """Start or join Ray, run the search's Tuner, then its confirmation runs (``search.confirm``;
    only those with ``confirm_only``); "finished" or "interrupted"."""
    import ray

    started = not ray.is_initialized()
    if started:
        # "local" starts a fresh instance: without it Ray would join whatever cluster
        # /tmp/ray/ray_current_cluster names (a user's `ray start`, or a stale one).
        with spared_children():  # a stop for the job reaches the driver, not its Ray
            ray.init(address=address or "local", include_dashboard=False,
                     log_to_driver=verbose > 1, configure_logging=False)
    if search.stops is not None and threading.current_thread() is threading.main_thread():
        search.stops.install()  # ray.init replaced them with handlers that abort the driver
    if verbose < 1:  # Tune's current console output prints its set-up even when told silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # A trial the records hold as ended returns at once, reporting nothing (``run_trial``); one
    # Tune's snapshot caught before its first result then ended the resumed search with Tune's
    # "did not include the specified metric(s)". The search file's metric is checked as the file
    # is read (a metric no trial reports is refused before Ray starts): Tune's check adds nothing.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    try:
        resources = search.space.settings.resources
        if not nodes_for(resources):
            said = (f"no node of this Ray can hold a trial ({_count(resources.cpu, 'CPU')} and "
                    f"{_count(resources.gpu, 'GPU')}, search.resources)")
            if started and not address:  # this machine's own Ray, with fewer CPUs (a quota)
                raise ConfigError("search.resources", said)
            log.warning("%s: its trials wait until one joins (an autoscaling cluster adds it; "
                        "else stop with Ctrl-C and ask for fewer)", said)
        with ray_messages_to(search.folder / RAY_LOG, verbose):  # after ray.init, which resets them
            ending = "finished" if confirm_only else _tune(search, verbose)
            if ending == "finished" and search.space.settings.confirm.top:
                from ltsearch.search.confirm import run_confirmation

                ending = run_confirmation(search, verbose)
            return ending
    finally:
        # Before the records close, not beside them: a shutdown on a thread of its own (to save
        # its second or two) raced whatever touched Ray meanwhile (an object's finaliser), and
        # Ray then ended the whole process, a Ctrl-C's records left RUNNING (seen in the tests).
        if started:
            ray.shutdown()


def trainable_for(search: Search):
    """Tune's trainable for the search's trials: the data once through the object store; trials
    the records hold as ended are not run again (see ``run_trial``)."""
    from ray import tune

    from ltsearch.search.callbacks import ended_before
    from ltsearch.search.trial import run_trial

    resources = search.space.settings.resources
    ended = ended_before(search.folder)
    return tune.with_resources(
        tune.with_parameters(run_trial, data=search.data, space=search.space,
                             compile_cache=str(search.folder / COMPILE_CACHE), ended=ended),
        {"cpu": resources.cpu, "gpu": resources.gpu})


def _tune(search: Search, verbose: int) -> str:
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from ltsearch.search.callbacks import ProgressCallback, ReportPreload, SearchCallback
    from ltsearch.search.ray_private import (prune_aware_optuna, replace_restored_callbacks,
                                             replace_restored_scheduler)
    from ltsearch.search.records import TrialRecords

    space, settings = search.space, search.space.settings
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose >= 1 else optuna.logging.WARNING)
    trainable = trainable_for(search)
    callbacks = [SearchCallback(search.folder, space, search.tracker),  # records first: the
                 ProgressCallback(search.folder, space, began=search.began)]  # progress reads them
    if settings.report:
        callbacks.append(ReportPreload(settings.num_samples, settings.max_concurrent))
    if search.resume:
        _resume_interrupted_trials(search)
        tuner = tune.Tuner.restore(str(search.ray_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        replace_restored_callbacks(tuner, callbacks)
        # Tune restores its scheduler as it was created: the rungs come back from the records
        replace_restored_scheduler(tuner, make_scheduler(settings, TrialRecords(search.folder).trials))
    else:
        storage_db = optuna.storages.RDBStorage(search.study_uri)
        many = settings.objectives is not None  # a multi-objective study: TPE over all,
        searcher = prune_aware_optuna()(           # ASHA and the records on the first
            space=space.define, metric=settings.objectives if many else settings.metric,
            mode=[settings.mode] * len(settings.objectives) if many else settings.mode,
            sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
            storage=storage_db, study_name=search.name, points_to_evaluate=_first_points(space))
        scheduler = make_scheduler(settings)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
                scheduler=scheduler, reuse_actors=settings.reuse_workers),
            run_config=tune.RunConfig(
                name=RAY_SUBDIR, storage_path=str(search.folder), callbacks=callbacks,
                verbose=2 if verbose >= 1 else 0,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    grid = tuner.fit()
    search.tune_trial_ids = {r.metrics.get("trial_id") for r in grid if r.metrics}
    # Tune returns normally after Ctrl-C (its handler saves the state): an interrupted search
    # has trials it knows still RUNNING in the records, or fewer trials than asked for.
    records = TrialRecords(search.folder)
    unfinished = [k for k, r in records.trials.items()
                  if r["status"] == "RUNNING" and k in search.tune_trial_ids]
    return "interrupted" if unfinished or len(grid) < settings.num_samples else "finished"


def _study(search: Search):
    import optuna

    return optuna.load_study(study_name=search.name, storage=search.study_uri)


def _set_optuna_state(search: Search, numbers: list[int], state) -> None:
    """Move Optuna trials to ``state`` through the storage's public API (``tell`` only
    finishes trials; an interrupted trial must stay resumable)."""
    import optuna

    if not numbers:
        return
    storage = optuna.storages.RDBStorage(search.study_uri)
    study_id = storage.get_study_id_from_name(search.name)
    for number in numbers:
        storage.set_trial_state_values(
            storage.get_trial_id_from_study_id_trial_number(study_id, number), state)


def _resume_interrupted_trials(search: Search) -> None:
    """Trials an interrupt parked as WAITING (sampled, not finished) run again: RUNNING, so
    Tune's restored searcher reports to them and TPE learns their results. Enqueued first
    points are WAITING too, but have no sampled values yet."""
    import optuna

    parked = [t.number for t in _study(search).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.WAITING,)) if t.params]
    _set_optuna_state(search, parked, optuna.trial.TrialState.RUNNING)


def finish_search(search: Search, ending: str, cause: Optional[BaseException] = None) -> SearchOutcome:
    """Always runs. Finished: trials Tune never recorded (a driver killed between snapshots) are
    LOST and their Optuna trials FAIL. Interrupted or failed: running trials are INTERRUPTED
    in trials.json and WAITING in Optuna (``--resume`` continues them), their MLflow runs
    KILLED. Then the leaderboard, trials.csv and best_config.yaml from what finished. A record
    that cannot be written (a full disk) does not stop the others from closing: what stayed
    open is in the outcome's ``unclosed``."""
    import optuna

    from ltsearch.search.records import TrialRecords, format_leaderboard, write_config
    from ltsearch.search.report import FIGURES

    settings = search.space.settings
    unclosed: list[str] = []

    def attempt(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:  # a full or lost disk: say which record, close the rest
            unclosed.append(f"{what} ({e.strerror or e})")
        except Exception as e:  # the study's sqlite on a full disk: "database or disk is full"
            if not _disk_error(e):
                raise
            unclosed.append(f"{what} (its database could not be written)")

    records = TrialRecords(search.folder)
    running = [k for k, r in records.trials.items() if r["status"] == "RUNNING"]
    open_optuna = []
    if (search.folder / "optuna.db").is_file():
        try:
            study = _study(search)
        except KeyError:  # the search stopped before its study was created (Ray did not start)
            study = None
        if study is not None:
            open_optuna = [t.number for t in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if ending == "finished":
        # Trials Tune never recorded (started after its last snapshot, then the driver stopped)
        # cannot be continued: RUNNING after a killed driver, INTERRUPTED after a stopped one.
        for trial_id, r in records.trials.items():
            if r["status"] in ONGOING and trial_id not in search.tune_trial_ids:
                attempt(str(records.path), records.update, trial_id, status="LOST",
                        error="the driver stopped before Ray recorded this trial; it was not resumed")
        study = _study(search) if open_optuna else None
        for number in open_optuna:
            attempt(f"the Optuna study {search.folder / 'optuna.db'}", study.tell, number,
                    state=optuna.trial.TrialState.FAIL)
    else:
        for trial_id in running:
            attempt(str(records.path), records.update, trial_id, status="INTERRUPTED")
        attempt(f"the Optuna study {search.folder / 'optuna.db'}", _set_optuna_state, search,
                open_optuna, optuna.trial.TrialState.WAITING)

    confirmed = records.confirmed(settings.metric, settings.mode)
    rows = records.leaderboard(settings.metric, settings.mode)
    board = format_leaderboard(rows, settings.metric, search.groups, confirmed)
    attempt(str(search.folder / "leaderboard.txt"), (search.folder / "leaderboard.txt").write_text, board + "\n")
    attempt(str(search.folder / "trials.csv"), records.write_csv, search.folder / "trials.csv")
    best = records.best_config(settings.metric, settings.mode)
    best_path = None
    if best is not None:
        best_path = search.folder / "best_config.yaml"
        attempt(str(best_path), write_config, best, best_path)
    elif ending == "finished":
        log.warning("no trial ran to the end; best_config.yaml not written")
    artifacts = [search.folder / "search.yaml", search.folder / "leaderboard.txt",
                 search.folder / "trials.csv"] + ([best_path] if best_path else [])
    report = _write_report(search.folder) if settings.report and records.trials and not unclosed else None
    if report is not None:
        artifacts += [report, report.parent / FIGURES]
    try:
        search.tracker.end_search(ending, artifacts)
    except Exception as e:  # a lost tracking server must not hide the search's own ending
        log.warning("tracking records not closed (%s: %s); --resume reopens them", type(e).__name__, e)
    return SearchOutcome(search.folder, records, best_path, board, search.tracker.search_id,
                         search.tracker.uri, ending, search.tracker.describe(), report,
                         search.stops.received if search.stops is not None else None, unclosed)


def _disk_error(e: Optional[BaseException]) -> bool:
    """A database error that is the disk's (sqlite: "database or disk is full", "disk I/O error")."""
    while e is not None:  # Optuna wraps sqlalchemy's error, which wraps sqlite3's
        text = str(e).lower()
        if "disk is full" in text or "disk i/o error" in text or "no space left" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _write_report(folder: Path) -> Optional[Path]:
    """The search's report page; a report that fails must not hide the search's ending."""
    from ltsearch.search.report import write_report

    try:
        return write_report(folder)
    except Exception as e:
        log.warning("report not written (%s: %s); `ltsearch report %s` tries again",
                    type(e).__name__, e, folder)
        return None


def _dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def parse_confirm(value: Optional[str]) -> Optional[dict]:
    """``--confirm K:S`` → ``{"top": K, "seeds": S}``."""
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError("--confirm", f"must be TOP:SEEDS, e.g. 3:5, got {value!r}")
    return {"top": int(parts[0]), "seeds": int(parts[1])}


def print_stopped(stop: SearchStopped, name: str, space, again: str) -> int:
    """The summary and one line on how to continue; the exit status."""
    print_summary(stop.outcome, name, space)
    if stop.outcome.ending == "interrupted":
        from ltsearch.search.signals import NAMES

        sig = stop.outcome.signal
        said = f"stopped by {NAMES[sig]}" if sig in NAMES and sig != signal.SIGINT else "interrupted"
        print(f"{said} — continue with `{again}`", file=sys.stderr)
        return 128 + int(sig or signal.SIGINT)
    cause = stop.cause
    unclosed = stop.outcome.unclosed
    if unclosed:
        then = (f"not written: {'; '.join(unclosed)}; once the disk has room again, `{again}` "
                "closes every record")
    elif isinstance(cause, TrackingError):
        then = (f"its folder and Optuna study are closed, its tracking records not: once the store "
                f"answers, `{again}` brings them up to date")
    else:
        then = f"everything recorded is closed; fix the cause, then `{again}`"
    if isinstance(cause, OSError) and cause.strerror:
        said = f"{type(cause).__name__}: {cause.strerror}" + (f": {cause.filename}" if cause.filename else "")
    else:
        said = _one_line(cause)
    print(f"error: the search stopped: {said}\n  {then}", file=sys.stderr)
    return 1


def main_search(args) -> int:
    from ltsearch.search.space import load_search_file

    name = args.name or search_name(args.space)
    overrides = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
                 "tracking": "none" if args.no_tracking else None, "confirm": parse_confirm(args.confirm)}
    stored = stored_settings(Path(args.storage) / name) if args.resume else None
    for key in (*FIXED_ON_RESUME, "tracking"):  # as the search ran, unless the command line says
        if overrides[key] is None and stored is not None:
            overrides[key] = getattr(stored, key)
    space = load_search_file(args.space, overrides)
    try:
        outcome = run_search(space, name=name, storage=args.storage, address=args.address,
                             tracking_uri=args.tracking_uri, resume=args.resume,
                             verbose=args.verbose, began=args.began)
    except ConfigError as e:
        if e.key.split(".")[0] in ("base", "search", "space"):  # the file against its data
            raise ConfigError(e.key, f"{e.message} (in {args.space})") from None
        raise
    except SearchStopped as stop:  # stopped before Tune saved anything: run it again, afresh
        resumable = (stop.outcome.folder / RAY_SUBDIR / "tuner.pkl").is_file()
        return print_stopped(stop, name, space, f"ltsearch search {args.space}"
                      + (" --resume" if resumable else "")
                      + (f" --name {args.name}" if args.name else "")
                      + (f" --storage {args.storage}" if args.storage != "searches" else ""))
    print_summary(outcome, name, space)
    return 0


def print_summary(outcome: SearchOutcome, name: str, space) -> None:
    counts: dict[str, int] = {}
    confirmations: dict[str, int] = {}
    for r in outcome.records.trials.values():
        kept = confirmations if r.get(CONFIRM_OF) else counts
        kept[r["status"]] = kept.get(r["status"], 0) + 1

    def said(c: dict) -> str:
        return ", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items()))

    if not counts:
        print(f"\nsearch {name}: no trial ran\n{outcome.tracking}")
        sys.stdout.flush()
        return
    more = f"; {sum(confirmations.values())} confirmation runs ({said(confirmations)})" if confirmations else ""
    print(f"\nsearch {name}: {sum(counts.values())} trials ({said(counts)}){more}")
    print(f"best trial per method (by {space.settings.metric}):\n{outcome.leaderboard}")
    if outcome.best_config:
        print(f"\nbest config: {outcome.best_config}\n  train it: ltsearch train {outcome.best_config}")
    objectives = space.settings.objectives
    if objectives:
        front = outcome.records.pareto(objectives, space.settings.mode)
        print(f"Pareto set over {', '.join(objectives)}: {len(front)} trials "
              f"({', '.join(r['method'] + ' ' + r['trial_id'] for r in front)})\n"
              f"  export it: ltsearch export {outcome.folder} --pareto --out DIR")
    if outcome.report:
        print(f"report: {outcome.report}")
    print(outcome.tracking)
    sys.stdout.flush()
