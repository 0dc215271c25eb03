"""The driver's one Tune callback: Tune's trial events, in order, to ``trials.json`` and the tracker.

Records are written first (they are what ``--resume``, export and the leaderboard read); the
tracker gets the same events, usually on its own thread. The callback also keeps, per trial,
when the driver saw it start and end and how long the driver spent on it (``driver_s``), so a
search's time can be accounted for.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback
from ray.tune.experiment import Trial

from ltsearch.recipes import reported_metrics
from ltsearch.search.records import (CONFIRM_OF, ONGOING, PAUSED_AT, SEED, WAITED_S, TrialRecords,
                                     error_text, finished_status, scalars)
from ltsearch.search.ray_private import keep_results
from ltsearch.search.rungs import BUDGET, BUDGETS, RUNG, RUNG_VALUES
from ltsearch.search.tracker import Tracker

log = logging.getLogger(__name__)

TRAINER_METRICS = ("lr", "images_per_s", "epoch_time_s", RUNG, BUDGET)  # the parts declare theirs


def confirmation(trial_config: dict) -> dict:
    """A confirmation trial's record fields (the trial it confirms, its seed); {} for others."""
    if CONFIRM_OF not in trial_config:
        return {}
    return {CONFIRM_OF: trial_config[CONFIRM_OF], SEED: trial_config[SEED]}


def tracker_tags(record: dict) -> dict:
    """Tags of a trial's tracking record: confirmation runs say so, and which trial and seed."""
    if not record.get(CONFIRM_OF):
        return {}
    return {"ltsearch.role": "confirmation", "ltsearch.confirm_of": record[CONFIRM_OF],
            "ltsearch.seed": str(record[SEED])}


def tracked_metrics(result: dict, part_metrics) -> dict:
    """The finite scalars of a report a tracker logs: split/metric, the trainer's and the parts'."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and ("/" in k or k in TRAINER_METRICS or k in part_metrics)}


class SearchCallback(Callback):
    """Keeps the search's records (the driver's one :class:`TrialRecords`, which every stage
    reads) and its tracker current with each trial event."""

    def __init__(self, records: TrialRecords, space, tracker: Tracker, backbone: Optional[dict] = None):
        self.records = records
        self.space = space
        self.tracker = tracker
        self.backbone = dict(backbone or {})  # recorded with every trial: which weights it started from
        self.part_metrics = reported_metrics()
        self.started: set[str] = set()  # trials the tracker has opened in this driver
        self.configs: dict[str, dict] = {}  # trial id → its full config (built once)
        self.ended = records.ended()  # not run again: their events change nothing

    def __getstate__(self):  # Tune pickles callbacks with the experiment; a restore replaces them
        return {"records": None, "space": self.space, "tracker": Tracker(), "backbone": self.backbone,
                "part_metrics": self.part_metrics, "started": set(), "configs": {},
                "ended": frozenset()}

    def _config(self, trial) -> dict:
        if trial.trial_id not in self.configs:
            self.configs[trial.trial_id] = self.space.trial_config(trial.config)
        return self.configs[trial.trial_id]

    def _open(self, trial) -> None:
        """Opens the tracker's record of a trial once per driver (a restored trial may report
        before a start event)."""
        if trial.trial_id not in self.started:
            self.started.add(trial.trial_id)
            cfg = self._config(trial)
            sha = self.backbone.get("weights_sha256")
            self.tracker.start_trial(trial.trial_id, self.space.label(cfg), cfg,
                                     {**tracker_tags(confirmation(trial.config)),
                                      **({"ltsearch.weights_sha256": sha} if sha else {})})

    def _timed(self, records: TrialRecords, trial_id: str, began: float, **fields) -> None:
        old = records.trials.get(trial_id, {}).get("driver_s", 0.0)
        records.update(trial_id, driver_s=old + time.perf_counter() - began, **fields)

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.ended:
            keep_results(trial)  # its own result files, not Tune's empty ones
            return
        began = time.perf_counter()
        cfg = self._config(trial)
        rec = self.records
        old = rec.trials.get(trial.trial_id, {})
        self._open(trial)
        now = time.time()
        waited = self._waited(trial.trial_id, old, now)
        self._timed(rec, trial.trial_id, began, method=self.space.label(cfg), config=cfg,
                    status="RUNNING", epochs=old.get("epochs", 0), total_epochs=old.get("total_epochs"),
                    metrics=old.get("metrics", {}), node_id=old.get("node_id"), error=None,
                    **{k: old.get(k) for k in (RUNG, BUDGETS, RUNG_VALUES)},
                    # a trial its rungs paused goes on: it keeps its start (the order trials
                    # began, the report's timeline); the time it held no worker counts apart
                    started_at=old["started_at"] if waited else now,
                    **(waited or {WAITED_S: old.get(WAITED_S, 0.0), PAUSED_AT: None}),
                    params=dict(trial.config), backbone=self.backbone or None,
                    **confirmation(trial.config))

    def _waited(self, trial_id: str, old: dict, now: float) -> dict:
        """A trial's rungs paused it and it goes on or stops now: the record's time waited, and
        the tracker is told it waits no more; {} for a trial that was not waiting."""
        if old.get("status") != "WAITING":
            return {}
        self.tracker.wait_trial(trial_id, False)
        return {WAITED_S: old.get(WAITED_S, 0.0) + now - old[PAUSED_AT], PAUSED_AT: None}

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:  # (Tune has no pause event for callbacks)
            r = self.records.trials.get(trial.trial_id)
            if trial.status == Trial.PAUSED and r and r["status"] == "RUNNING":
                self.records.update(trial.trial_id, status="WAITING", **{PAUSED_AT: time.time()})
                self._open(trial)
                self.tracker.wait_trial(trial.trial_id, True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.ended:
            return
        began = time.perf_counter()
        rec = self.records
        self._open(trial)
        self.tracker.log(trial.trial_id, int(result.get("epoch", 0)),
                         tracked_metrics(result, self.part_metrics))
        self._timed(rec, trial.trial_id, began, epochs=result.get("epoch"),
                    total_epochs=result.get("total_epochs"), metrics=scalars(result),
                    node_id=result.get("node_id"),
                    **{k: result.get(k) for k in (RUNG, BUDGETS, RUNG_VALUES)})

    def _end(self, trial, status: str, error=None) -> None:
        if trial.trial_id in self.ended:
            return
        began = time.perf_counter()
        rec = self.records
        self._open(trial)
        now = time.time()
        waited = self._waited(trial.trial_id, rec.trials.get(trial.trial_id, {}), now)
        self.tracker.end_trial(trial.trial_id, status, self._config(trial), trial.last_result or {},
                               error)
        self._timed(rec, trial.trial_id, began, status=status, error=error, ended_at=now, **waited)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, finished_status(trial.last_result))
        self._keep_model(trial)

    def _keep_model(self, trial) -> None:
        """A trial's model, saved with its last report (``search.keep_models``), moved into
        the search folder, or dropped where it is not among the k best."""
        from ltsearch.search.kept import MODEL_SUBDIR, keep

        checkpoint = trial.checkpoint
        if trial.trial_id in self.ended or checkpoint is None:
            return
        source = Path(checkpoint.path) / MODEL_SUBDIR
        settings = self.space.settings
        if not Path(checkpoint.path).is_dir():  # written on another node's disk
            if settings.keep_models:
                log.warning("trial %s: its model is in %s on the node it ran on, not kept here "
                            "(a search folder all nodes share keeps them)", trial.trial_id, checkpoint.path)
            return
        if not source.is_dir():
            return
        try:
            keep(self.records, trial.trial_id, source, settings.keep_models, settings.metric, settings.mode)
        except OSError as e:
            log.warning("trial %s: its model was not kept (%s)", trial.trial_id, e)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED", error_text(trial))


class ReportPreload(Callback):
    """Once fewer trials are left to end than there are slots, a slot stays free until the
    search ends: the report's imports (about 2 s of CPU) run then, on a thread, rather than
    after the last trial, when everyone waits for the page."""

    def __init__(self, total: int, slots: int):
        self.total, self.slots, self.started = total, slots, False

    def _check(self, trials, trial) -> None:
        ended = sum(t is trial or t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        if not self.started and self.slots > 1 and ended > self.total - self.slots:
            from ltsearch.search.report import preload

            self.started = True
            threading.Thread(target=preload, name="report-preload", daemon=True).start()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._check(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trials, trial)


def _searched(trial_config: dict) -> str:
    """The values Optuna chose for a trial, in a few words: ``lr 0.012, loss.name focal``."""
    words = []
    for key, value in trial_config.items():
        if key == "method":
            continue
        name = key.split(".", 1)[1] if "." in key and not key.startswith("train.") else key
        name = name.removeprefix("train.")
        words.append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(words)


def rungs_said(result: dict, settings, ranked_out: bool = True) -> str:
    """Where a trial ended, in words: the rungs it ran, and the values they ended with
    (``ranked_out``: and that the last one ranked it out; not so for a trial that waits)."""
    budgets, values = result.get(BUDGETS), result.get(RUNG_VALUES) or []
    if not budgets or len(budgets) == 1:
        return f"after {result.get('epoch', 0)} of {result.get('total_epochs', '?')} epochs"
    ended = ", ".join(f"{b}-epoch run {v:.3f}" if isinstance(v, (int, float)) else f"{b}-epoch run"
                      for b, v in zip(budgets, values))
    if len(values) >= len(budgets):
        return f"after {len(budgets)} rungs ({ended})"
    why = (f"; not among the best 1/{settings.asha.reduction_factor:g} of rung {len(values)}"
           if values and ranked_out else "")
    return f"in rung {result.get(RUNG, 0) + 1} of {len(budgets)} ({ended or 'none ended'}{why})"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def quiet_trial_progress() -> Callback:
    """Tune adds its TrialProgressCallback unless one is given, and that one's "Trial … completed.
    Last result: …" line ignores the verbosity (a resumed search printed one per trial it
    skipped). Given this one, at verbosity 0 nothing of Tune's per-trial printing runs; ours
    (:class:`ProgressCallback`) says what matters."""
    from ray.tune.progress_reporter import TrialProgressCallback

    class QuietTrialProgress(TrialProgressCallback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            pass

        def on_trial_error(self, iteration, trials, trial, **info):
            pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            pass

    return QuietTrialProgress()


class ProgressCallback(Callback):
    """One line per trial event that matters (started, waits, goes on, finished, pruned,
    failed) and a progress line: trials done of the total, the time since the command started
    (``began``, on ``clock``), an estimate of what is left, the best so far. On a terminal the
    progress line is a bar redrawn in place; in a log it follows each trial's end."""

    def __init__(self, records: TrialRecords, space, out=None, confirming: bool = False,
                 began: Optional[float] = None, clock=time.monotonic):
        self.records = records  # the search's, kept current by its SearchCallback
        self.space = space
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.confirming = confirming  # counts the confirmation runs, not the search's trials
        confirm = space.settings.confirm
        self.total = confirm.top * confirm.seeds if confirming else space.settings.num_samples
        self.metric = space.settings.metric
        self.clock = clock
        self.began = clock() if began is None else began
        self.drawn = 0.0
        self.done_before = self._counts()[0]  # trials that ended before this driver (a resume)
        self.ended = records.ended()
        self.first_start: Optional[float] = None  # this driver's first trial start
        self.waiting: set[str] = set()  # trials paused by the rungs, said so

    def __getstate__(self):
        return {**self.__dict__, "out": None, "records": None}

    def _counts(self) -> tuple[int, Optional[dict]]:
        """Trials ended so far, and the best so far: of the full runs that ended by the search's
        metric; before any, of the first rung's values (a waiting trial's too: a trial stopped
        there and one at its full run's end are not compared), ``first_rung`` set."""
        records = self.records
        ended = sum(r["status"] not in ONGOING for r in records.trials.values()
                    if bool(r.get(CONFIRM_OF)) == self.confirming)
        mode = self.space.settings.mode
        if self.confirming:
            confirmed = records.confirmed(self.metric, mode)
            return ended, (confirmed[0] if confirmed else None)
        ranked = records.ranked(self.metric, mode)
        if ranked:
            return ended, ranked[0]
        first = [r for r in records.trials.values() if not r.get(CONFIRM_OF) and r.get(RUNG_VALUES)
                 and r[RUNG_VALUES][0] is not None and math.isfinite(r[RUNG_VALUES][0])]
        if not first:
            return ended, None
        best = (max if mode == "max" else min)(first, key=lambda r: r[RUNG_VALUES][0])
        return ended, {**best, "metrics": {self.metric: best[RUNG_VALUES][0]}, "first_rung": True}

    def _bar(self) -> str:
        done, best = self._counts()
        now = self.clock()
        here = done - self.done_before
        left = ""
        if 0 < here and done < self.total and self.first_start is not None:  # at the rate trials end
            left = f" · ~{_clock((now - self.first_start) / here * (self.total - done))} left"
        width = 20
        filled = int(width * done / max(self.total, 1))
        if best and self.confirming:
            top = f" · best mean {best['mean']:.3f} ± {best['std']:.3f} ({best['method']} {best['trial_id'][-8:]})"
        else:
            top = (f" · best{' first rung' if best.get('first_rung') else ''} "
                   f"{best['metrics'][self.metric]:.3f} ({best['method']} {best['trial_id'][-8:]})"
                   if best else "")
        what = "confirmation runs" if self.confirming else "trials"
        return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {what} · " \
               f"{_clock(now - self.began)}{left}{top}"

    def _say(self, line: str, bar: bool = False) -> None:
        if self.tty:
            self.out.write("\r\033[K" + line + "\n" + self._bar())
        else:
            self.out.write(line + "\n" + (self._bar() + "\n" if bar else ""))
        self.out.flush()

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:  # (Tune has no pause event for callbacks)
            if trial.status == "PAUSED" and trial.trial_id not in self.waiting | self.ended:
                self.waiting.add(trial.trial_id)
                self._say(f"waits    {trial.trial_id[-8:]}  "
                          f"{rungs_said(trial.last_result or {}, self.space.settings, False)}, until "
                          f"its place at that rung is known")
        if self.tty and self.clock() - self.drawn >= 1.0:  # the clock moves on a terminal
            self.drawn = self.clock()
            self.out.write("\r\033[K" + self._bar())
            self.out.flush()

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.ended:
            return
        if trial.trial_id in self.waiting:
            self.waiting.discard(trial.trial_id)
            self._say(f"goes on  {trial.trial_id[-8:]}  among the best of every rung it ended")
            return
        if self.first_start is None:
            self.first_start = self.clock()
        cfg = self.space.trial_config(trial.config)
        confirms = confirmation(trial.config)
        chosen = (f"confirms {confirms[CONFIRM_OF]} with seed {confirms[SEED]}" if confirms
                  else _searched(trial.config))
        self._say(f"started  {trial.trial_id[-8:]}  {self.space.label(cfg)}" + (f"  ({chosen})" if chosen else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.ended:
            return
        result = trial.last_result or {}
        status = finished_status(result)
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.3f}" if isinstance(value, (int, float)) else "no result"
        word = "finished" if status == "COMPLETED" else "pruned  "
        self._say(f"{word} {trial.trial_id[-8:]}  {rungs_said(result, self.space.settings)}  "
                  f"{shown}", bar=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id in self.ended:
            return
        epochs = (trial.last_result or {}).get("epoch", 0)
        self._say(f"failed   {trial.trial_id[-8:]}  after {epochs} epochs: {error_text(trial) or 'see ray.log'}",
                  bar=True)

    def on_experiment_end(self, trials, **info):
        if self.tty:
            self.out.write("\n")
            self.out.flush()
