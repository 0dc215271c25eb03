"""The search's Tune scheduler: :class:`ltsearch.search.rungs.Rungs` deciding on each report."""
from __future__ import annotations

from ray.tune.schedulers import FIFOScheduler

from ltsearch.search.rungs import BUDGETS, RUNG_VALUES, Rungs


class RungScheduler(FIFOScheduler):
    """Stops a trial (PRUNED) as soon as one of its ended rungs ranks it out; see
    :mod:`ltsearch.search.rungs`. Tune does not keep a scheduler's state across a resume, so a
    resumed search rebuilds it from the records (:meth:`restore_records`)."""

    def __init__(self, reduction_factor: float, mode: str):
        super().__init__()
        self.rungs = Rungs(reduction_factor, mode)

    def restore_records(self, records: dict) -> None:
        """The rung values of every trial in ``trials.json`` (a resumed search's)."""
        for trial_id, record in records.items():
            if record.get(RUNG_VALUES):
                self.rungs.record(trial_id, record[RUNG_VALUES])

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        values = result.get(RUNG_VALUES)
        if values is None or BUDGETS not in result:
            return self.CONTINUE
        return self.CONTINUE if self.rungs.decide(trial.trial_id, values, len(result[BUDGETS])) else self.STOP
