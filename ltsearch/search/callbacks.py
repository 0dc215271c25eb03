"""The driver's Tune callback that keeps ``trials.json`` current (the only Ray in the records)."""
from __future__ import annotations

from pathlib import Path

from ray.tune import Callback

from ltsearch.search.records import TrialRecords, error_text, finished_status, scalars


class RecordsCallback(Callback):
    """Keeps ``trials.json`` current from the driver."""

    def __init__(self, folder: Path, space):
        self.folder = Path(folder)
        self.space = space

    def _records(self) -> TrialRecords:
        return TrialRecords(self.folder)

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = self.space.trial_config(trial.config)
        rec = self._records()
        old = rec.trials.get(trial.trial_id, {})
        rec.update(trial.trial_id, method=self.space.label(cfg), config=cfg, status="RUNNING",
                   epochs=old.get("epochs", 0), total_epochs=old.get("total_epochs"),
                   metrics=old.get("metrics", {}), node_id=old.get("node_id"), error=None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._records().update(trial.trial_id, epochs=result.get("epoch"),
                               total_epochs=result.get("total_epochs"), metrics=scalars(result),
                               node_id=result.get("node_id"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._records().update(trial.trial_id, status=finished_status(trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._records().update(trial.trial_id, status="FAILED", error=error_text(trial))
