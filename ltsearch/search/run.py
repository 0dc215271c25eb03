"""``ltsearch search``: Ray Tune + Optuna (define-by-run TPE) + ASHA, tracked in MLflow.

Stages, each a function, handing on one open search folder (:class:`Search`): check
everything (the search file when read; then the folder, the tracking store and the data,
writing nothing — bad input exits 2 before Ray starts: :mod:`ltsearch.search.checks`), prepare
the folder and the MLflow runs, execute (Ray Tune with Optuna and ASHA, the data in the object
store once; then confirmation, :mod:`ltsearch.search.confirm`), and finish — always, after an
interrupt or an error too — closing every record in agreement and writing the leaderboard and
``best_config.yaml`` (:mod:`ltsearch.search.finish`).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import traceback
from pathlib import Path
from typing import Optional

from ltsearch.config import ConfigError
from ltsearch.search.checks import check_machine_holds, check_search, count, nodes_for, resolve_address
from ltsearch.search.finish import SearchOutcome, SearchStopped, _disk_error, finish_search
from ltsearch.search.opened import RAY_SUBDIR, Search
from ltsearch.search.records import CONFIRM_OF, LIVE, ONGOING
from ltsearch.search.signals import StopSignals, spared_children
from ltsearch.search.tracker import TrackingError

log = logging.getLogger(__name__)


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


def make_scheduler(settings, records: dict):
    """Successive halving over complete runs when a trial has rungs before its full run
    (:mod:`ltsearch.search.rungs`), else none. ``records``: the search's trials.json, as its
    callback keeps it (a resumed search's rungs are rebuilt from them; their order is the
    order trials started in, which brackets count)."""
    from ray.tune.schedulers import FIFOScheduler

    from ltsearch.search.scheduler import RungScheduler

    if len(settings.asha.fractions()) < 2:
        return FIFOScheduler()
    waits = settings.asha.wait  # a trial waits (paused) until its rung ranks it for good
    return RungScheduler(settings.asha.reduction_factor, settings.mode,
                         settings.num_samples if waits else None, settings.max_concurrent,
                         settings.asha.bracket_of(settings.num_samples), records)


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
            done = f"confirming {settings.confirm.said()}: every run has ended"
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
        ending, cause = "failed", _own_cause(e, search.folder / "optuna.db")
    finally:
        with search.stops.closing_records():
            outcome = finish_search(search, ending, cause)
    if ending != "finished":
        raise SearchStopped(outcome, cause)
    return outcome


def _own_cause(e: Exception, study_file: Path) -> Exception:
    """Tune wraps what our callbacks raise in a TuneError whose message is the whole
    traceback; a lost tracking store (a TrackingError, one line by design) and a disk that
    failed (an OSError: full, gone) are shown as themselves, and so is whatever else a
    TuneError wraps (the first exception of its chain). The study's sqlite on a full disk
    says only "database or disk is full": that one is told as the disk error it is, naming
    ``study_file``."""
    if isinstance(e.__context__, TrackingError):
        return e.__context__
    chain, seen = [], e
    while seen is not None and seen not in chain:
        if isinstance(seen, OSError):
            return seen
        said = (str(seen.args[0] if seen.args else seen).splitlines() or [""])[0]
        if _disk_error(said) and _raised_in(seen, "optuna"):
            return OSError(errno.ENOSPC, f"{said} (the Optuna study)", str(study_file))
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    log.debug("the search stopped", exc_info=e)  # the whole traceback, for debug logging
    return chain[-1] if type(e).__name__ == "TuneError" else e


def _raised_in(e: BaseException, package: str) -> bool:
    """Whether ``e`` passed through ``package``'s code on its way up."""
    part = f"{os.sep}{package}{os.sep}"
    return any(part in frame.filename for frame in traceback.extract_tb(e.__traceback__))


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


def say_starting(search: Search, address: Optional[str], confirm_only: bool) -> None:
    """One line once the checks have passed, before the seconds Ray takes to start: what runs,
    where its results go, which Ray."""
    import ray

    settings = search.space.settings
    methods = len(search.space.methods)
    if confirm_only:
        what = "confirmation runs"
    else:
        what = f"{count(settings.num_samples, 'trial')} over {count(methods, 'method')}"
        if search.resume:
            ended = sum(r["status"] not in ONGOING for r in
                        search.records.trials.values() if not r.get(CONFIRM_OF))
            what = f"resuming {what} ({ended} ended)"
        fractions = settings.asha.fractions()
        if len(fractions) > 1:  # the default rungs depend on the runs' length: say which
            what += (f", rungs at {' / '.join(f'{f:.3g}' for f in fractions)} of each run "
                     f"(η {settings.asha.reduction_factor:g}")
            bracket = settings.asha.bracket_of(settings.num_samples)
            what += f", ranked in brackets of {bracket})" if bracket else ")"
        if settings.confirm.top:
            what += f", then {settings.confirm.said()}"
    where = ("on the Ray already running" if ray.is_initialized()
             else f"joining the Ray cluster at {address}" if address else "starting a local Ray")
    print(f"search {search.name}: {what}, {settings.max_concurrent} at a time, in {search.folder}; "
          f"{where}", flush=True)


def _trials_left(search: Search) -> bool:
    """Whether some of the search's trials (not its confirmation runs) have not run or ended."""
    trials = [r for r in search.records.trials.values() if not r.get(CONFIRM_OF)]
    return len(trials) < search.space.settings.num_samples or any(
        r["status"] in ONGOING for r in trials)


def _check_finished(search: Search) -> None:
    if _trials_left(search):
        raise ConfigError("search_dir", f"the search in {search.folder} has not finished: continue "
                                        "it with `ltsearch search FILE --resume` first")


def _catch_up_tracker(search: Search) -> None:
    """On a resume, trials that ended in the records but whose tracker calls were lost (a
    killed driver, a lost tracking server) are recorded again from Ray's per-epoch results."""
    from ltsearch.recipes import reported_metrics
    from ltsearch.search.callbacks import tracked_metrics, tracker_tags
    from ltsearch.search.results import read_reports

    part_metrics = reported_metrics()
    all_reports = read_reports(search.folder)
    for trial_id, r in search.records.trials.items():
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
        "search.methods": ",".join(search.space.methods), "data": search.data.summary(),
        **{f"backbone.{k}": v for k, v in search.backbone.items() if v is not None}})
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
        "experiment": search.space.settings.experiment or "ltsearch",
        "backbone": search.backbone}, indent=1))


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
            said = (f"no node of this Ray can hold a trial ({count(resources.cpu, 'CPU')} and "
                    f"{count(resources.gpu, 'GPU')}, search.resources)")
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


def _tune(search: Search, verbose: int) -> str:
    import optuna
    from ray import tune

    from ltsearch.search.callbacks import (ProgressCallback, ReportPreload, SearchCallback,
                                           quiet_trial_progress)
    from ltsearch.search.limiter import SearchLimiter, agreeing
    from ltsearch.search.ray_private import (prune_aware_optuna, replace_restored_callbacks,
                                             replace_restored_scheduler, restored_search_alg)

    space, settings = search.space, search.space.settings
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose >= 1 else optuna.logging.WARNING)
    trainable = search.trainable()
    callbacks = [SearchCallback(search.records, space, search.tracker, search.backbone),  # records first: the
                 ProgressCallback(search.records, space, began=search.began)]  # progress reads them
    if settings.report:
        callbacks.append(ReportPreload(settings.num_samples, settings.max_concurrent))
    if verbose < 1:
        callbacks.append(quiet_trial_progress())
    if search.resume:
        _resume_interrupted_trials(search)
        tuner = tune.Tuner.restore(str(search.ray_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Tune restores its scheduler as it was created: the rungs come back from the records
        scheduler = make_scheduler(settings, search.records.trials)
        replace_restored_callbacks(tuner, callbacks + agreeing(restored_search_alg(tuner), scheduler))
        replace_restored_scheduler(tuner, scheduler)
    else:
        storage_db = optuna.storages.RDBStorage(search.study_uri)
        many = settings.objectives is not None  # a multi-objective study: TPE over all,
        searcher = prune_aware_optuna()(           # ASHA and the records on the first
            space=space.define, metric=settings.objectives if many else settings.metric,
            mode=[settings.mode] * len(settings.objectives) if many else settings.mode,
            sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
            storage=storage_db, study_name=search.name, points_to_evaluate=_first_points(space))
        scheduler = make_scheduler(settings, search.records.trials)
        limiter = SearchLimiter(searcher, settings.max_concurrent, settings.num_samples)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                search_alg=limiter, scheduler=scheduler, reuse_actors=settings.reuse_workers),
            run_config=tune.RunConfig(
                name=RAY_SUBDIR, storage_path=str(search.folder),
                callbacks=callbacks + agreeing(limiter, scheduler),
                verbose=2 if verbose >= 1 else 0,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    grid = tuner.fit()
    search.tune_trial_ids = {r.metrics.get("trial_id") for r in grid if r.metrics}
    # Tune returns normally after Ctrl-C (its handler saves the state): an interrupted search
    # has trials it knows still RUNNING in the records, or fewer trials than asked for.
    unfinished = [k for k, r in search.records.trials.items()
                  if r["status"] in LIVE and k in search.tune_trial_ids]
    return "interrupted" if unfinished or len(grid) < settings.num_samples else "finished"


def _resume_interrupted_trials(search: Search) -> None:
    """Trials an interrupt parked as WAITING (sampled, not finished) run again: RUNNING, so
    Tune's restored searcher reports to them and TPE learns their results. Enqueued first
    points are WAITING too, but have no sampled values yet."""
    import optuna

    parked = [t.number for t in search.study().get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.WAITING,)) if t.params]
    search.set_trial_states(parked, optuna.trial.TrialState.RUNNING)


def _dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


