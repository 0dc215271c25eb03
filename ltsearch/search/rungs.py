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
ended that rung so far. A rung is never decided on few values for good, either way:

- a trial promoted while a rung was nearly empty is stopped at its next report once later trials
  outrank it there, so the first trials (the enqueued ones) gain nothing from meeting empty rungs;
- a trial ranked out at the end of a rung that is not yet *settled* (trials still to end it)
  **waits** instead of stopping (Tune pauses it; it holds no worker): later trials may end the
  rung worse, and ⌈n/η⌉ grows with n. It goes on as soon as it ranks in, and stops once the rung
  is settled with it still out. Asynchronous halving without this stops for good on a rung's
  first few values: on CIFAR-10-LT (``scripts/bench_fidelity.py``, 8 seeds) the full-training
  top 3 reached their end in 79 % of the seeds decided at once, 92 % waiting (rungs at 0.25;
  compute 58 → 66 %).

Decisions depend on the values recorded only, so a resumed search (the records rebuilt from
``trials.json``) decides as an uninterrupted one.

This module imports no Ray: :class:`RungScheduler` (``ltsearch.search.scheduler``) wraps it for
Tune, and the benchmark replays it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ltsearch.config import ConfigError, spec

RUNG_VALUES = "rung_values"  # a report's key: the metric at the end of each rung it has run
RUNG = "rung"                # the rung a report belongs to (0-based)
BUDGET = "budget"            # epochs of that rung's complete run
BUDGETS = "budgets"          # epochs of each rung's run, the last the trial's full length
RUNG_VALUE = "rung/value"    # on the report that ends a rung: the value it ended with
GO, STOP, WAIT = "go", "stop", "wait"  # the scheduler's decisions (WAIT: Tune pauses the trial)


# The default rungs: the first at 1/8 of the run, where on CIFAR-10-LT (30 epochs, 8 seeds) it ranks
# recipes at ρ 0.70 against the mean of full training and keeps the top 3 in 96 % of seeds at 49 %
# of the compute (1/4: 0.80, 92 %, 66 %); but never under 4 epochs: 2 of a 16-epoch digits run end
# its two-stage recipes far below the rest (mislas 0.26, two_stage 0.47; 0.95 both in full) and
# cut the best recipe in 3 of 6 seeds (``scripts/bench_fidelity.py``, README).
FIRST_RUNG, FIRST_RUNG_EPOCHS = 0.125, 4


@dataclass
class AshaSettings:
    """Successive halving over complete runs: rung k trains the trial's whole recipe compressed
    to ``rungs[k]`` of its length; after each rung a trial goes on only among the best
    1/``reduction_factor`` of those that ended it."""
    enabled: bool = spec(True, doc="false: every trial trains its full run once, none is stopped")
    rungs: Optional[list[float]] = spec(
        None, doc="fractions of each trial's length, rising to 1.0: each rung trains the whole "
                  f"recipe compressed to it (default: [{FIRST_RUNG:g}, 1.0], the first rung at "
                  f"least {FIRST_RUNG_EPOCHS} epochs of the shortest run the space allows; none "
                  f"when that is the whole run)")
    reduction_factor: float = spec(3.0, gt=1.0, doc="a rung keeps its best 1/η")
    wait: bool = spec(True, doc="a trial ranked out before its rung is settled waits (paused) "
                                "instead of stopping; false: every decision is final at once")
    grace_period: Optional[int] = spec(None, doc="removed: rungs are fractions of a complete "
                                                 "run (asha.rungs)")

    def check(self):
        if self.grace_period is not None:
            raise ConfigError("grace_period", "ASHA no longer stops a run after some of its epochs "
                              "(an early epoch of a long-tail recipe says little about its end): "
                              "each rung trains the whole recipe compressed; give asha.rungs, "
                              "fractions of a trial's length such as [0.25, 1.0]")
        r = self.rungs
        if r is not None and (not r or r[-1] != 1.0 or r[0] <= 0.0
                              or any(a >= b for a, b in zip(r, r[1:]))):
            raise ConfigError("rungs", f"must rise from above 0 to 1.0 (the full run), got {r!r}")

    def settle(self, shortest_epochs: int) -> None:
        """Fix the default rungs for a search whose shortest run trains ``shortest_epochs``
        (stage 1): every trial is judged on the same fractions, so the floor holds for all."""
        if self.rungs is None:
            first = max(FIRST_RUNG, FIRST_RUNG_EPOCHS / shortest_epochs)
            self.rungs = [first, 1.0] if first < 1.0 else [1.0]

    def fractions(self) -> list[float]:
        """The rungs a search trial runs (one full run without ASHA)."""
        if not self.enabled:
            return [1.0]
        if self.rungs is None:
            raise ValueError("the default rungs depend on the run's length: settle() them first")
        return list(self.rungs)


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

    def out_at(self, trial_id: str, rungs: int) -> Optional[int]:
        """The first rung the trial is not among the best ⌈n/η⌉ at (None: it ranks in at every
        rung it has ended, except the last of the ``rungs`` rungs, which ends the trial)."""
        for k, rung in enumerate(self.values[:rungs - 1]):
            if trial_id in rung and not self._top(rung, trial_id):
                return k
        return None

    def kept(self, trial_id: str, rungs: int) -> bool:
        return self.out_at(trial_id, rungs) is None

    def ended(self, trial_id: str, rung: int) -> bool:
        """Whether the trial has a value at that rung."""
        return rung < len(self.values) and trial_id in self.values[rung]

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

    def verdict(self, trial_id: str, values: list, rungs: int, at_rung_start: bool,
                settled: Callable[[int], bool]) -> str:
        """A report's decision: GO, STOP, or WAIT — the trial ranks out at a rung that is not
        ``settled`` yet, and the report ends a rung or is the first of one (a trial that waited
        across a resume; nothing is lost stopping it there). Later in a run an outranked trial
        stops (it went on while its rung was nearly empty)."""
        if self.decide(trial_id, values, rungs):
            return GO
        return WAIT if at_rung_start and not settled(self.out_at(trial_id, rungs)) else STOP

    def waited(self, trial_id: str, rungs: int, settled: Callable[[int], bool]) -> Optional[str]:
        """A waiting trial's turn: GO once it ranks in, STOP once the rung it ranks out at is
        settled, None while neither."""
        k = self.out_at(trial_id, rungs)
        if k is None:
            return GO
        return STOP if settled(k) else None
