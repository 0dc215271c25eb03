"""The driver's one Tune callback: Tune's trial events, in order, to ``trials.json`` and the tracker.

Records are written first (they are what ``--resume``, export and the leaderboard read); the
tracker gets the same events, usually on its own thread. The callback also keeps, per trial,
when the driver saw it start and end and how long the driver spent on it (``driver_s``), so a
search's time can be accounted for.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from ray.tune import Callback

from ltsearch.recipes import reported_metrics
from ltsearch.search.records import TrialRecords, error_text, finished_status, scalars
from ltsearch.search.tracker import Tracker

TRAINER_METRICS = ("lr", "images_per_s", "epoch_time_s")  # the recipe's parts declare theirs


def tracked_metrics(result: dict, part_metrics) -> dict:
    """The finite scalars of a report a tracker logs: split/metric, the trainer's and the parts'."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and ("/" in k or k in TRAINER_METRICS or k in part_metrics)}


class SearchCallback(Callback):
    def __init__(self, folder: Path, space, tracker: Tracker):
        self.folder = Path(folder)
        self.space = space
        self.tracker = tracker
        self.part_metrics = reported_metrics()
        self.started: set[str] = set()  # trials the tracker has opened in this driver

    def __getstate__(self):  # Tune pickles callbacks with the experiment; a restore replaces them
        return {"folder": self.folder, "space": self.space, "tracker": Tracker(),
                "part_metrics": self.part_metrics, "started": set()}

    def _records(self) -> TrialRecords:
        return TrialRecords(self.folder)

    def _config(self, trial) -> dict:
        return self.space.trial_config(trial.config)

    def _open(self, trial, records: TrialRecords) -> None:
        """Opens the tracker's record of a trial once per driver (a restored trial may report
        before a start event)."""
        if trial.trial_id not in self.started:
            self.started.add(trial.trial_id)
            cfg = self._config(trial)
            self.tracker.start_trial(trial.trial_id, self.space.label(cfg), cfg)

    def _timed(self, records: TrialRecords, trial_id: str, began: float, **fields) -> None:
        old = records.trials.get(trial_id, {}).get("driver_s", 0.0)
        records.update(trial_id, driver_s=old + time.perf_counter() - began, **fields)

    def on_trial_start(self, iteration, trials, trial, **info):
        began = time.perf_counter()
        cfg = self._config(trial)
        rec = self._records()
        old = rec.trials.get(trial.trial_id, {})
        self._open(trial, rec)
        self._timed(rec, trial.trial_id, began, method=self.space.label(cfg), config=cfg,
                    status="RUNNING", epochs=old.get("epochs", 0), total_epochs=old.get("total_epochs"),
                    metrics=old.get("metrics", {}), node_id=old.get("node_id"), error=None,
                    started_at=time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        began = time.perf_counter()
        rec = self._records()
        self._open(trial, rec)
        self.tracker.log(trial.trial_id, int(result.get("epoch", 0)),
                         tracked_metrics(result, self.part_metrics))
        self._timed(rec, trial.trial_id, began, epochs=result.get("epoch"),
                    total_epochs=result.get("total_epochs"), metrics=scalars(result),
                    node_id=result.get("node_id"))

    def _end(self, trial, status: str, error=None) -> None:
        began = time.perf_counter()
        rec = self._records()
        self._open(trial, rec)
        self.tracker.end_trial(trial.trial_id, status, self._config(trial), trial.last_result or {},
                               error)
        self._timed(rec, trial.trial_id, began, status=status, error=error, ended_at=time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, finished_status(trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED", error_text(trial))
