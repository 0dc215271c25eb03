"""The search's Tune scheduler: :class:`ltsearch.search.rungs.Rungs` deciding on each report."""
from __future__ import annotations

from typing import Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from ltsearch.search.records import CONFIRM_OF
from ltsearch.search.rungs import BUDGETS, GO, RUNG_VALUE, RUNG_VALUES, STOP, WAIT, Rungs


class RungScheduler(FIFOScheduler):
    """Stops a trial (PRUNED) once one of its ended rungs ranks it out for good; see
    :mod:`ltsearch.search.rungs`. A trial ranked out at a rung that is not settled waits, PAUSED
    at the rung's end (its checkpoint holds only the values: the next rung starts from scratch),
    and is resumed when it ranks in or stopped when the rung settles; Ray Tune's HyperBand
    pauses and stops its trials the same way. A rung is settled when the search holds all its
    ``num_samples`` trials and each has ended that rung or ended for good (None: every rung is
    settled, decisions are final at once, as the search decided before 2026-12-03).

    Tune does not keep a scheduler's state across a resume, so a resumed search rebuilds it from
    the records (:meth:`restore_records`)."""

    def __init__(self, reduction_factor: float, mode: str, num_samples: Optional[int] = None,
                 max_concurrent: Optional[int] = None):
        super().__init__()
        self.rungs = Rungs(reduction_factor, mode)
        self.num_samples, self.max_concurrent = num_samples, max_concurrent
        self.total: dict[str, int] = {}  # trial id → its number of rungs (from its reports)

    def restore_records(self, records: dict) -> None:
        """The rung values of every trial in ``trials.json`` (a resumed search's)."""
        for trial_id, record in records.items():
            if record.get(RUNG_VALUES):
                self.rungs.record(trial_id, record[RUNG_VALUES])
            if record.get(BUDGETS):
                self.total[trial_id] = len(record[BUDGETS])

    # ---------------------------------------------------------------------------------------

    def settled(self, tune_controller, rung: int, ending: Optional[str] = None) -> bool:
        """Whether no trial can still end the rung (``ending``: a trial Tune is ending now)."""
        if self.num_samples is None or tune_controller is None:
            return True
        trials = [t for t in tune_controller.get_trials() if CONFIRM_OF not in t.config]
        if len(trials) < self.num_samples:  # more trials to come
            return False
        return all(t.is_finished() or t.trial_id == ending or self.rungs.ended(t.trial_id, rung)
                   for t in trials)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        values = result.get(RUNG_VALUES)
        if values is None or BUDGETS not in result:
            return self.CONTINUE
        rungs = self.total[trial.trial_id] = len(result[BUDGETS])
        at_start = RUNG_VALUE in result or result.get("rung_epoch") == 1
        verdict = self.rungs.verdict(trial.trial_id, values, rungs, at_start,
                                     lambda k: self.settled(tune_controller, k))
        self._turns(tune_controller)  # a new value can rank a waiting trial in, or settle it out
        return {GO: self.CONTINUE, STOP: self.STOP, WAIT: self.PAUSE}[verdict]

    def on_trial_complete(self, tune_controller, trial, result):
        self._turns(tune_controller, trial.trial_id)

    def on_trial_error(self, tune_controller, trial):
        self._turns(tune_controller, trial.trial_id)

    def on_trial_remove(self, tune_controller, trial):
        self._turns(tune_controller, trial.trial_id)

    def _last_value(self, trial_id: str) -> float:
        ended = [rung[trial_id] for rung in self.rungs.values if trial_id in rung]
        return ended[-1] if ended else float("-inf")

    def _turns(self, tune_controller, ending: Optional[str] = None) -> list:
        """Stops the waiting trials their settled rungs rank out (PRUNED: Optuna and the
        records are told through Tune's stop); returns those that rank in, the best first."""
        if tune_controller is None or self.num_samples is None:
            return []
        going = []
        waiting = [t for t in tune_controller.get_trials() if t.status == Trial.PAUSED
                   and not t.is_saving and t.trial_id in self.total and t.trial_id != ending]
        for t in sorted(waiting, key=lambda t: -self._last_value(t.trial_id)):
            turn = self.rungs.waited(t.trial_id, self.total[t.trial_id],
                                     lambda k: self.settled(tune_controller, k, ending))
            if turn == STOP:
                tune_controller.stop_trial(t)
            elif turn == GO:
                going.append(t)
        return going

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        """A new trial first; then a waiting one that ranks in, while fewer than
        ``max_concurrent`` run (the searcher's limit counts no waiting trial)."""
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        going = self._turns(tune_controller)  # (stops those settled out: none is left waiting)
        running = sum(t.status == Trial.RUNNING for t in tune_controller.get_trials())
        if going and (self.max_concurrent is None or running < self.max_concurrent):
            return going[0]
        for trial in tune_controller.get_trials():  # paused by no decision of the rungs
            if trial.status == Trial.PAUSED and trial.trial_id not in self.total:
                return trial
        return None
