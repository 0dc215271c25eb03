"""``ltsearch search``: Ray Tune + Optuna (define-by-run TPE) + ASHA, tracked in MLflow.

Order of work: validate the search file and load + long-tail the data on the driver (bad input
exits 2 before any Ray worker starts), start or join Ray, put the data in the object store once,
run the Tuner, then write the leaderboard and ``best_config.yaml``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ltsearch.config import ConfigError
from ltsearch.runconfig import config_from_dict

log = logging.getLogger(__name__)

RAY_SUBDIR = "ray"


def _prune_aware_optuna():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PruneAwareOptunaSearch(OptunaSearch):
        """Optuna sees every epoch's value at step = epoch, and trials that ASHA stopped are
        told as PRUNED with those intermediate values, not COMPLETE with an early value (Ray's
        default). Tune hands the last result of a trial to ``on_trial_complete`` only, so it is
        reported there too."""

        def _report(self, trial_id, result):
            value, epoch = result.get(self.metric), result.get("epoch")
            steps = self.__dict__.setdefault("_reported_steps", {}).setdefault(trial_id, set())
            if value is not None and epoch is not None and epoch not in steps:
                try:
                    self._ot_trials[trial_id].report(value, epoch)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # A resumed search re-runs a trial the study had already closed (the
                    # driver died between the two snapshots); the study keeps its record.
                    self._completed_trials.add(trial_id)
                steps.add(epoch)

        def on_trial_result(self, trial_id, result):
            if trial_id not in self._completed_trials:
                self._report(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials or error or not result:
                return super().on_trial_complete(trial_id, result, error)
            self._report(trial_id, result)
            if trial_id in self._completed_trials:
                return
            if result["epoch"] < result.get("total_epochs", result["epoch"]):
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
            else:
                super().on_trial_complete(trial_id, result, error)

    return PruneAwareOptunaSearch


@dataclass
class SearchOutcome:
    folder: Path
    records: "object"
    best_config: Optional[Path]
    leaderboard: str
    parent_run_id: str
    tracking_uri: str


def _first_points(space) -> list[dict] | None:
    """One enqueued trial per method (its other parameters sampled), so none goes untried."""
    methods = list(space.methods)
    if not space.settings.cover_methods or len(methods) < 2 or space.settings.num_samples < len(methods):
        return None
    return [{"method": m} for m in methods]


def search_name(path: str | Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)


def run_search(space, *, name: str, storage: str | Path = "searches", address: Optional[str] = None,
               tracking_uri: Optional[str] = None, resume: bool = False,
               verbose: int = 1) -> SearchOutcome:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from ltsearch.search import tracking
    from ltsearch.data import build_data
    from ltsearch.search.callbacks import RecordsCallback
    from ltsearch.search.records import TrialRecords, format_leaderboard, write_config
    from ltsearch.search.trial import run_trial

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot often: cheap, resumes more
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tracking.prepare_environment()
    # Our files (trials.json, optuna.db, best_config.yaml…) live in ``folder``; Ray's experiment
    # in ``folder/ray``, which Tune syncs from its own staging copy (it would overwrite ours).
    folder = (Path(storage) / name).resolve()
    ray_dir = folder / RAY_SUBDIR
    if resume and not (ray_dir / "tuner.pkl").is_file():
        raise ConfigError("--resume", f"no search to resume at {folder}")
    if not resume and (ray_dir / "tuner.pkl").exists():
        raise ConfigError("--name", f"a search named {name!r} exists in {folder.parent}; "
                                    "pass --resume to continue it or choose another --name")
    uri = tracking_uri or tracking.default_tracking_uri()
    tracking.check_reachable(uri)
    base = config_from_dict(space.base)
    data = build_data(base.data)  # once, on the driver
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "search.yaml").write_text(_dump(space.source))

    settings = space.settings
    exp_id = tracking.experiment_id(uri, settings.experiment or "ltsearch")
    parent = tracking.start_parent_run(uri, exp_id, folder, name, {
        "search.metric": settings.metric, "search.mode": settings.mode,
        "search.num_samples": settings.num_samples, "search.seed": settings.seed,
        "search.max_concurrent": settings.max_concurrent,
        "search.methods": ",".join(space.methods), "data": data.summary()})

    if not ray.is_initialized():
        # "local" starts a fresh instance: without it Ray would join whatever cluster
        # /tmp/ray/ray_current_cluster names (a user's `ray start`, or a stale one).
        ray.init(address=address or "local", include_dashboard=False,
                 log_to_driver=verbose > 1, configure_logging=False)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, space=space),
        {"cpu": settings.resources.cpu, "gpu": settings.resources.gpu})
    callbacks = [RecordsCallback(folder, space),
                 tracking.MLflowTracker(uri, exp_id, parent, space, data.classes, data.counts)]

    if resume:
        tuner = tune.Tuner.restore(str(ray_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        tuner._local_tuner._run_config.callbacks = callbacks  # the pickled ones are stale
    else:
        storage_db = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
        searcher = _prune_aware_optuna()(
            space=space.define, metric=settings.metric, mode=settings.mode,
            sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
            storage=storage_db, study_name=name, points_to_evaluate=_first_points(space))
        max_t = space.max_epochs()
        if settings.asha.enabled:
            scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t,
                                      grace_period=min(settings.asha.grace_period, max_t),
                                      reduction_factor=settings.asha.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
                scheduler=scheduler, reuse_actors=False),
            run_config=tune.RunConfig(
                name=RAY_SUBDIR, storage_path=str(folder), callbacks=callbacks, verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    started = time.time()
    grid = tuner.fit()

    # A driver killed between Tune's snapshots leaves trials Tune never recorded: close them.
    known = {r.metrics.get("trial_id") for r in grid if r.metrics}
    records = TrialRecords(folder)
    for trial_id, r in records.trials.items():
        if r["status"] == "RUNNING" and trial_id not in known:
            records.update(trial_id, status="LOST", error="the driver stopped before Ray recorded "
                                                          "this trial; it was not resumed")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    rows = records.leaderboard(settings.metric, settings.mode)
    board = format_leaderboard(rows, settings.metric)
    (folder / "leaderboard.txt").write_text(board + "\n")
    records.write_csv(folder / "trials.csv")
    ranked = records.ranked(settings.metric, settings.mode)
    best_path = None
    if ranked:
        best_path = folder / "best_config.yaml"
        write_config(ranked[0]["config"], best_path)
    else:
        log.warning("no trial ran to the end; best_config.yaml not written")
    tracking.end_parent_run(uri, parent, [folder / "search.yaml", folder / "leaderboard.txt",
                                          folder / "trials.csv"] + ([best_path] if best_path else []))
    log.info("search took %.0f s", time.time() - started)
    return SearchOutcome(folder, records, best_path, board, parent, uri)


def _dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def main_search(args) -> int:
    from ltsearch.search.space import load_search_file

    overrides = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent}
    space = load_search_file(args.space, overrides)
    name = args.name or search_name(args.space)
    outcome = run_search(space, name=name, storage=args.storage, address=args.address,
                         tracking_uri=args.tracking_uri, resume=args.resume)
    n = len(outcome.records.trials)
    counts = {}
    for r in outcome.records.trials.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"\nsearch {name}: {n} trials ({', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))})")
    print(f"best trial per method (by {space.settings.metric}):\n{outcome.leaderboard}")
    if outcome.best_config:
        print(f"\nbest config: {outcome.best_config}\n  train it: ltsearch train {outcome.best_config}")
    print(f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    sys.stdout.flush()
    return 0
