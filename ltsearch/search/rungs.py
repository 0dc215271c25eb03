"""Successive halving over complete runs: each rung trains a trial's *whole* recipe compressed to
a fraction of its length, and only a rung's end is compared with other trials' ends.

Why not ASHA on a run's epochs: long-tail recipes defer their re-balancing (DRW at 80 %, a second
stage, BBN's α, mixup until near the end), so at an early epoch every recipe is plain CE at a high
learning rate, and successive halving there removes the recipes that end best. A run compressed
to 1/8 of its length goes through every phase of its recipe (fraction-valued knobs keep their
place, a second stage shortens alike, the schedule decays to its end), so its end ranks recipes
as full training does (``scripts/bench_fidelity.py`` measures how well).

The rule, for a trial whose reports carry the values its runs ended with (``rung_values``):
it goes on while, at every rung it has ended, it is among the best ⌈n/η⌉ of the n trials that
ended that rung so far. A rung is never decided on few values for good: a trial promoted while a
rung was nearly empty is stopped at its next report once later trials outrank it there, so the
first trials (the enqueued ones) gain nothing from meeting empty rungs. Decisions depend on the
values recorded only, so a resumed search (the records rebuilt from ``trials.json``) decides as an
uninterrupted one.

This module imports no Ray: :class:`RungScheduler` (``ltsearch.search.scheduler``) wraps it for
Tune, and the benchmark replays it.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

RUNG_VALUES = "rung_values"  # a report's key: the metric at the end of each rung it has run
RUNG = "rung"                # the rung a report belongs to (0-based)
BUDGET = "budget"            # epochs of that rung's complete run
BUDGETS = "budgets"          # epochs of each rung's run, the last the trial's full length
RUNG_VALUE = "rung/value"    # on the report that ends a rung: the value it ended with


class Rungs:
    """The values trials ended each rung with, and who may go on."""

    def __init__(self, reduction_factor: float, mode: str = "max"):
        self.eta = reduction_factor
        self.sign = 1.0 if mode == "max" else -1.0
        self.values: list[dict[str, float]] = []  # rung → trial id → value (larger is better)

    def record(self, trial_id: str, values: Iterable[Optional[float]]) -> None:
        """A trial's value at the end of each rung it ran (idempotent: every report repeats
        them, so a trial restored from a checkpoint brings its values back)."""
        for k, v in enumerate(values):
            while len(self.values) <= k:
                self.values.append({})
            # a diverged or NaN value ranks last, as Tune's ASHA does with its nanpercentile
            self.values[k][trial_id] = (self.sign * v if v is not None and math.isfinite(v)
                                        else -math.inf)

    def kept(self, trial_id: str, rungs: int) -> bool:
        """Whether the trial is among the best ⌈n/η⌉ at every rung it has ended, except the
        last of the ``rungs`` rungs (which ends the trial)."""
        for rung in self.values[:rungs - 1]:
            if trial_id in rung and not self._top(rung, trial_id):
                return False
        return True

    def cutoff_rank(self, n: int) -> int:
        """How many of n trials at a rung go on: the best ⌈n/η⌉."""
        return max(1, math.ceil(n / self.eta))

    def _top(self, rung: dict[str, float], trial_id: str) -> bool:
        better = sum(v > rung[trial_id] for v in rung.values())  # ties go on together
        return better < self.cutoff_rank(len(rung))

    def decide(self, trial_id: str, values: list, rungs: int) -> bool:
        """Record a report's rung values and say whether the trial goes on."""
        self.record(trial_id, values)
        return len(values) >= rungs or self.kept(trial_id, rungs)
