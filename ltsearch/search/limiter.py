"""One trial at a time (or ``search.max_concurrent``), as Ray Tune's ConcurrencyLimiter, made to
agree with the experiment it is restored into.

Tune snapshots its experiment (the trials) and its searcher (the limiter's running trials, the
count of trials suggested) in separate files, one after the other. A full disk, or a driver
killed between the two, can leave the searcher's older: it still counts as running a trial that
the experiment's snapshot holds ended and Tune never runs again. Restored so, the limit stays
full for ever, no trial runs, and the resumed search waits for ever (seen after a full disk);
its count of trials is behind too, so with room it would start one more than asked. At the
first step of a resumed run, :class:`AgreeWithTune` gives the limiter Tune's trials: running
trials Tune does not hold unfinished are forgotten, and no trial is suggested past
``num_samples`` trials that Tune holds.
"""
from __future__ import annotations

import logging
from typing import Optional

from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter, Searcher

log = logging.getLogger(__name__)


class SearchLimiter(ConcurrencyLimiter):
    def __init__(self, searcher: Searcher, max_concurrent: int, num_samples: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.num_samples = num_samples
        self.tune_trials: Optional[int] = None  # the trials Tune holds, once told (a resume)
        self.waiting: set[str] = set()  # paused trials (the rungs'): they hold no worker

    def __setstate__(self, state):  # a snapshot of an older ltsearch has no waiting trials
        self.__dict__.update(state)
        self.__dict__.setdefault("waiting", set())

    def agree_with(self, trials: list) -> None:
        unfinished = {t.trial_id for t in trials if not t.is_finished()}
        stale = self.live_trials - unfinished
        if stale:
            log.info("Tune's searcher snapshot is older than its experiment's: %s no longer "
                     "running", ", ".join(sorted(stale)))
            self.live_trials -= stale
            self.num_unfinished_live_trials = len(self.live_trials)
        self.tune_trials = len(trials)

    def suggest(self, trial_id: str):
        if self.tune_trials is not None and self.tune_trials >= self.num_samples:
            return Searcher.FINISHED
        if len(self.live_trials - self.waiting) >= self.max_concurrent:
            return None  # (ConcurrencyLimiter's rule, less the trials that wait)
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
            if self.tune_trials is not None:
                self.tune_trials += 1
        return suggestion


class AgreeWithTune(Callback):
    """Hands a restored :class:`SearchLimiter` the trials Tune restored, once, before any event
    is processed (later, a trial Tune has ended may not yet have been reported to it); and at
    every step the trials that wait paused, which its limit does not count (else trials that
    wait for their place at a rung to be known would hold the places of the trials that decide
    it), but those the scheduler holds ready to go on (``ready``: its set of their ids)."""

    def __init__(self, limiter: SearchLimiter, ready: frozenset | set = frozenset()):
        self.limiter = limiter
        self.ready = ready
        self.done = False

    def on_step_begin(self, iteration: int, trials: list, **info):
        if not self.done:
            self.done = True
            self.limiter.agree_with(trials)
        self.limiter.waiting = {t.trial_id for t in trials
                                if t.status == "PAUSED" and t.trial_id not in self.ready}


def agreeing(search_alg, scheduler=None) -> list:
    """The callback that makes a restored limiter agree with Tune, if it is one (a search
    started by an older ltsearch restores Tune's own ConcurrencyLimiter), and count the
    waiting trials ``scheduler`` (a :class:`~ltsearch.search.scheduler.RungScheduler`) holds
    ready to go on."""
    ready = getattr(scheduler, "ready", frozenset())  # (no rungs: a FIFOScheduler, none ready)
    return [AgreeWithTune(search_alg, ready)] if isinstance(search_alg, SearchLimiter) else []
