"""Successive halving over complete runs: each rung trains a trial's *whole* recipe compressed to
a fraction of its length, and only a rung's end is compared with other trials' ends.

Why not ASHA on a run's epochs: long-tail recipes defer their re-balancing (DRW at 80 %, a second
stage, BBN's α, mixup until near the end), so at an early epoch every recipe is plain CE at a high
learning rate, and successive halving there removes the recipes that end best. A run compressed
to 1/8 of its length goes through every phase of its recipe (fraction-valued knobs keep their
place, a second stage shortens alike, the schedule decays to its end), so its end ranks recipes
as full training does (``scripts/bench_fidelity.py`` measures how well).

The rule, for a trial whose reports carry the values its runs ended with (``rung_values``):
after each rung a trial goes on only if it is among the best ⌈m/η⌉ of the m trials that end
that rung, and it goes on only once that is **known**. While trials may still end a rung (the
search has trials to start, or trials that have not ended it), a trial's place there is known
only sometimes: it is in for good when it would stay in even if every trial still to end the
rung ended it better, out for good once ⌈m/η⌉ trials (m at its largest) ended it better. Until
one is known it **waits** (Tune pauses it; it holds no worker). So:

- the trials that reach their end are the ones synchronous successive halving keeps, the best
  ⌈m/η⌉ of each rung (by brackets, below), whatever order a bracket's trials start and end in
  and however many run at a time: the first trials (the enqueued ones) gain nothing from
  meeting empty rungs, and no trial is stopped for good on a rung's first few values;
- no compute goes to a longer run that a later trial would have cut. Until 2026-12-03 evening
  a trial went on while it ranked in *so far* and was stopped at its next report once later
  trials outranked it, waiting only while ranked out (``wait: false`` decides at once on the
  values so far): on CIFAR-10-LT (``scripts/bench_fidelity.py``, 8 seeds, the default rungs)
  that spent 49 % of the compute of training every recipe to its end, this rule 45 %, with the
  same share of the full-training top 3 reaching their end.

The price is when results come (to the user, and to TPE, which learns from decided trials only):
ranked among all of a search's trials, even the best first-rung value goes on only once about
(1 − 1/η) of them have ended that rung, so TPE would sample a third of a 100-trial search before
any trial was pruned. So trials are ranked in **brackets** (``asha.bracket``, 12 by default) by
the order they start: a trial's rungs rank it among the trials that started before it or in its
bracket (the first 12, the first 24, …), and are settled once those have ended them, whatever
later trials do. The first bracket's decisions come after its own 12 rung runs; a later
bracket's trial still has to beat every earlier trial's values (ranked among them all, not a
Hyperband bracket of its own). A search of at most 12 trials is one bracket: ranked all
together, as the benchmark measured.

Decisions depend on the values recorded and the order trials started in only, both kept in
``trials.json``, so a resumed search (the rungs rebuilt from it) decides as an uninterrupted one.

This module imports no Ray: :class:`RungScheduler` (``ltsearch.search.scheduler``) wraps it for
Tune, and the benchmark replays it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Container, Iterable, Optional

from ltsearch.config import ConfigError, spec

RUNG_VALUES = "rung_values"  # a report's key: the metric at the end of each rung it has run
RUNG = "rung"                # the rung a report belongs to (0-based)
BUDGET = "budget"            # epochs of that rung's complete run
BUDGETS = "budgets"          # epochs of each rung's run, the last the trial's full length
RUNG_VALUE = "rung/value"    # on the report that ends a rung: the value it ended with
GO, STOP, WAIT = "go", "stop", "wait"  # the scheduler's decisions (WAIT: Tune pauses the trial)


# The default rungs: the first at 1/8 of the run, where on CIFAR-10-LT (30 epochs, 8 seeds) it ranks
# recipes at ρ 0.70 against the mean of full training and keeps the top 3 in 96 % of seeds at 45 %
# of the compute (1/4: 0.80, 88 %, 60 %); but never under 4 epochs: 2 of a 16-epoch digits run end
# its two-stage recipes far below the rest (mislas 0.26, two_stage 0.47; 0.95 both in full) and
# cut the best recipe in 3 of 6 seeds (``scripts/bench_fidelity.py``, README).
FIRST_RUNG, FIRST_RUNG_EPOCHS = 0.125, 4
# Trials ranked together, by start order: the 12 presets a search covers first are one bracket,
# as the benchmark ranks them (``scripts/bench_fidelity.py --bracket`` replays smaller ones).
BRACKET = 12


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
    wait: bool = spec(True, doc="a trial goes on or stops once its rung ranks it in or out for "
                                "good, and waits (paused) until then; false: decided at once "
                                "on the values so far")
    bracket: Optional[int] = spec(
        BRACKET, ge=2, doc="with wait: a trial's rungs rank it among the trials started before it "
                           "or in its bracket of this many (by start order), and are settled once "
                           "those have ended them; null: among all the search's trials (decisions "
                           "come only once most of the search has run its first rung)")
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

    def bracket_of(self, num_samples: int) -> Optional[int]:
        """The bracket a search of ``num_samples`` trials ranks them in: None when it ranks
        them all together (one bracket holds them, or decisions do not wait)."""
        if not self.wait or self.bracket is None or self.bracket >= num_samples:
            return None
        return self.bracket

    def fractions(self) -> list[float]:
        """The rungs a search trial runs (one full run without ASHA)."""
        if not self.enabled:
            return [1.0]
        if self.rungs is None:
            raise ValueError("the default rungs depend on the run's length: settle() them first")
        return list(self.rungs)


def ranked_among(order: list[str], trial_id: str, size: Optional[int], total: int) -> int:
    """How many trials a trial's rungs rank it among: of the search's ``total``, in start order
    (``order``: those started so far), the trials up to the end of its bracket of ``size``
    (all ``total`` without brackets; a trial not in ``order`` is taken as the next to start)."""
    if size is None:
        return total
    at = order.index(trial_id) if trial_id in order else len(order)
    return min(total, (at // size + 1) * size)


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
        """Whether the trial is among the best ⌈n/η⌉ of the n trials so far at every rung it
        has ended (but the last of the ``rungs`` rungs, which ends the trial)."""
        return all(self._better(rung, trial_id) < self.cutoff_rank(len(rung))
                   for rung in self.values[:rungs - 1] if trial_id in rung)

    def ended(self, trial_id: str, rung: int) -> bool:
        """Whether the trial has a value at that rung."""
        return rung < len(self.values) and trial_id in self.values[rung]

    def cutoff_rank(self, n: int) -> int:
        """How many of n trials at a rung go on: the best ⌈n/η⌉."""
        return max(1, math.ceil(n / self.eta))

    @staticmethod
    def _better(rung: dict[str, float], trial_id: str) -> int:
        return sum(v > rung[trial_id] for v in rung.values())  # ties go on together

    def standing(self, trial_id: str, rungs: int, most: Callable[[int], int],
                 peers: Optional[Container[str]] = None) -> Optional[str]:
        """GO: the trial ranks in at every rung it has ended (but the last) however the rungs'
        other trials end them; STOP: one ranks it out for good; None: not known yet.
        ``peers``: the trials it is ranked among (its bracket and those before; None: all);
        ``most(k)``: the most of them that can end rung k, those that have included (when every
        one has, the rung is settled and its ranking final). A rung's cut is ⌈m/η⌉ of the m
        that end it: with b trials better and at most m − n still to end it, the trial is in
        for good when b + (m − n) < ⌈m/η⌉, out for good when b ≥ ⌈m/η⌉ (taking the largest
        m binds both: ⌈m/η⌉ grows more slowly than m)."""
        known = GO
        for k, rung in enumerate(self.values[:rungs - 1]):
            if trial_id not in rung:
                continue
            if peers is not None:
                rung = {t: v for t, v in rung.items() if t in peers or t == trial_id}
            n, m = len(rung), max(most(k), len(rung))
            better = self._better(rung, trial_id)
            if better >= self.cutoff_rank(m):
                return STOP
            if better + (m - n) >= self.cutoff_rank(m):
                known = None
        return known

    def verdict(self, trial_id: str, values: list, rungs: int, at_rung_start: bool,
                most: Callable[[int], int], peers: Optional[Container[str]] = None) -> str:
        """A report's decision (its rung values recorded): GO, STOP, or WAIT — the report ends a
        rung or is the first of one (a trial that waited across a resume; nothing is lost
        pausing it there) and its :meth:`standing` is not known yet. Later in a run (a trial
        that went on before this rule, or decided at once) it goes on while it ranks in so far."""
        self.record(trial_id, values)
        if len(values) >= rungs:
            return GO
        standing = self.standing(trial_id, rungs, most, peers)
        if standing is not None:
            return standing
        if at_rung_start:
            return WAIT
        return GO if self.kept(trial_id, rungs) else STOP
