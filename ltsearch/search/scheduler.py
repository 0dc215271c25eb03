"""The search's Tune scheduler: :class:`ltsearch.search.rungs.Rungs` deciding on each report."""
from __future__ import annotations

from typing import Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from ltsearch.search.records import CONFIRM_OF, ONGOING
from ltsearch.search.rungs import (BUDGETS, GO, RUNG_VALUE, RUNG_VALUES, STOP, WAIT, Rungs,
                                   ranked_among)


class RungScheduler(FIFOScheduler):
    """Decides each trial's rungs by :mod:`ltsearch.search.rungs`: a trial goes on once a rung
    ranks it in for good, is stopped (PRUNED) once one ranks it out for good, and waits, PAUSED
    at the rung's end (its checkpoint holds only the values: the next rung starts from scratch),
    while neither is known; Ray Tune's HyperBand pauses and stops its trials the same way. What
    can still change a rung's ranking is the trials that may still end it: the search's
    ``num_samples`` less those that ended without it (None: only those that have ended it,
    decisions at once on the values so far, as the search decided before 2026-12-03), and with
    ``bracket`` only those up to the end of the trial's bracket in start order.

    ``records``: the search's ``trials.json`` as its callback keeps it, live. Tune does not keep
    a scheduler's state across a resume, so a resumed search's rungs are rebuilt from them; and
    their order is the start order the brackets count in (a record is made as its trial first
    starts, before it reports, and keeps its place; Tune's own list of trials a resume reorders
    by their last result)."""

    def __init__(self, reduction_factor: float, mode: str, num_samples: Optional[int] = None,
                 max_concurrent: Optional[int] = None, bracket: Optional[int] = None,
                 records: Optional[dict] = None):
        super().__init__()
        self.rungs = Rungs(reduction_factor, mode)
        self.num_samples, self.max_concurrent, self.bracket = num_samples, max_concurrent, bracket
        self.total: dict[str, int] = {}  # trial id → its number of rungs (from its reports)
        # waiting trials ranked in for good: they go on at the next free worker, so the search's
        # limiter counts them as running (else it starts a new trial in their place)
        self.ready: set[str] = set()
        self.records = {} if records is None else records
        for trial_id, record in self.records.items():  # a resumed search's rungs
            if record.get(RUNG_VALUES):
                self.rungs.record(trial_id, record[RUNG_VALUES])
            if record.get(BUDGETS):
                self.total[trial_id] = len(record[BUDGETS])

    # ---------------------------------------------------------------------------------------

    def field(self, tune_controller, trial_id: str, ending: Optional[str] = None):
        """What a trial's rungs rank it among: ``(most, peers)`` for :meth:`Rungs.standing`.
        ``most(k)``: the most trials that can end rung k, the search's ``num_samples`` (those
        still to come included) up to the end of the trial's bracket, but those that ended
        without it (``ending``: a trial Tune is ending now); ``peers``: those trials' ids
        (None: all). None ``num_samples``: those that have ended it (decisions on the values
        so far)."""
        def so_far(k):
            return len(self.rungs.values[k]) if k < len(self.rungs.values) else 0

        if self.num_samples is None or tune_controller is None:
            return so_far, None
        tune = {t.trial_id: t for t in tune_controller.get_trials() if CONFIRM_OF not in t.config}
        if self.bracket is None:
            upto, peers, ids = max(self.num_samples, len(tune)), None, list(tune)
        else:  # (a trial Tune never recorded, LOST in the records, keeps its place there)
            started = [i for i, r in self.records.items() if not r.get(CONFIRM_OF)]
            total = max(self.num_samples, len(tune), len(started))
            upto = ranked_among(started, trial_id, self.bracket, total)
            peers = ids = started[:upto]

        def finished(i):
            t = tune.get(i)
            return i == ending or (t.is_finished() if t is not None
                                   else self.records[i]["status"] not in ONGOING)

        def most(k):
            return upto - sum(finished(i) and not self.rungs.ended(i, k) for i in ids)

        return most, (None if peers is None else set(peers))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        values = result.get(RUNG_VALUES)
        if values is None or BUDGETS not in result:
            return self.CONTINUE
        rungs = self.total[trial.trial_id] = len(result[BUDGETS])
        at_start = RUNG_VALUE in result or result.get("rung_epoch") == 1
        verdict = self.rungs.verdict(trial.trial_id, values, rungs, at_start,
                                     *self.field(tune_controller, trial.trial_id))
        self._turns(tune_controller)  # a new value can rank a waiting trial in or out for good
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
        """Stops the waiting trials a rung ranks out for good (PRUNED: Optuna and the records
        are told through Tune's stop); returns those that rank in for good, the best first."""
        if tune_controller is None or self.num_samples is None:
            return []
        going = []
        waiting = [t for t in tune_controller.get_trials() if t.status == Trial.PAUSED
                   and not t.is_saving and t.trial_id in self.total and t.trial_id != ending]
        for t in sorted(waiting, key=lambda t: -self._last_value(t.trial_id)):
            turn = self.rungs.standing(t.trial_id, self.total[t.trial_id],
                                       *self.field(tune_controller, t.trial_id, ending))
            if turn == STOP:
                tune_controller.stop_trial(t)
            elif turn == GO:
                going.append(t)
        self.ready.clear()  # (in place: the limiter's callback holds this set)
        self.ready.update(t.trial_id for t in going)
        return going

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        """A waiting trial that ranks in for good first, while fewer than ``max_concurrent``
        run (its full result, for the user and for TPE, comes before more first rungs; new
        trials first left it waiting to the search's end; the limiter counts it, :attr:`ready`,
        so no new trial takes its worker), then a new one."""
        trials = tune_controller.get_trials()
        going = self._turns(tune_controller)  # (stops those out for good)
        running = sum(t.status == Trial.RUNNING for t in trials)
        if going and (self.max_concurrent is None or running < self.max_concurrent):
            return going[0]
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        for trial in trials:  # paused by no decision of the rungs
            if trial.status == Trial.PAUSED and trial.trial_id not in self.total:
                return trial
        return None
