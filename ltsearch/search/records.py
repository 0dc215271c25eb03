"""The search folder's own record of its trials (``trials.json``), kept by the driver.

Export, the leaderboard and ``best_config.yaml`` read it, so they need neither Ray nor MLflow
(this module imports neither), and it survives a killed driver: it is rewritten atomically after
every result. :class:`ltsearch.search.callbacks.RecordsCallback` keeps it current.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path
from typing import Optional

import yaml

from ltsearch.dotted import flatten
from ltsearch.metrics import SCALARS
from ltsearch.search.folder import damaged, read_json
from ltsearch.search.rungs import BUDGETS, RUNG_VALUES

TRIALS_FILE = "trials.json"
CONFIRM_OF = "confirm_of"  # a confirmation run's record (and Tune config): the trial it confirms,
SEED = "seed"              # and its fresh seed
WAITED_S, PAUSED_AT = "waited_s", "paused_at"  # a record's time paused by its rungs, since when
LIVE = ("RUNNING", "WAITING")  # a trial the search holds: training, or paused by its rungs
ONGOING = (*LIVE, "INTERRUPTED")  # a trial's statuses before it ends (--resume continues it)
SCALAR_METRICS = (*(f"val/{m}" for m in SCALARS), *(f"test/{m}" for m in SCALARS), "train/loss")


def finished_status(result: Optional[dict]) -> str:
    """COMPLETED when the trial ran all its epochs, else PRUNED (a scheduler stopped it)."""
    if result and result.get("epoch") is not None and result.get("epoch") >= result.get("total_epochs", 1e9):
        return "COMPLETED"
    return "PRUNED"


def rungs_text(record: dict) -> str:
    """A trial's rungs in a few words: each run's epochs → the value it ended with
    (``2 → 0.713 · 16 → 0.957``); epochs alone for a rung it did not end."""
    budgets, values = record.get(BUDGETS) or [], record.get(RUNG_VALUES) or []
    if not budgets:
        return str(record.get("epochs", 0))
    return " · ".join(f"{b} → {values[k]:.3f}" if k < len(values) and _finite(values[k]) else f"{b} → –"
                      for k, b in enumerate(budgets))


def scalars(result: dict) -> dict:
    """The scalar metrics of a report (NaN, e.g. an empty shot group, as None)."""
    return {k: (v if math.isfinite(v) else None) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k}


class TrialRecords:
    def __init__(self, folder: Path):
        self.path = Path(folder) / TRIALS_FILE
        self.trials: dict[str, dict] = read_json(self.path, {})
        if not isinstance(self.trials, dict) or not all(
                isinstance(r, dict) and "status" in r for r in self.trials.values()):
            raise damaged(self.path, "not a record of trials")

    def save(self) -> None:
        """Atomically: a failed write (a full disk) leaves the last complete file, and says
        which file it was."""
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.trials, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def ended(self) -> frozenset:
        """The trials that have ended. Those ended when a driver starts stay as recorded: a
        resume restores one that Tune's older snapshot held unfinished, and ``run_trial``
        skips it."""
        return frozenset(k for k, r in self.trials.items() if r["status"] not in ONGOING)

    def update(self, trial_id: str, **fields) -> None:
        self.trials.setdefault(trial_id, {"trial_id": trial_id}).update(fields)
        self.save()

    def ranked(self, metric: str, mode: str, completed_only: bool = True) -> list[dict]:
        """The search's trials (not confirmation runs) by ``metric``, best first."""
        rows = [r for r in self.trials.values() if not r.get(CONFIRM_OF)
                and (not completed_only or r["status"] == "COMPLETED") and _finite(r["metrics"].get(metric))]
        return sorted(rows, key=lambda r: r["metrics"][metric], reverse=(mode == "max"))

    def confirmed(self, metric: str, mode: str) -> list[dict]:
        """Per confirmed trial, its confirmation runs that ran to the end: ``mean`` and ``std``
        (sample, 0 for one seed) of ``metric`` over ``n`` seeds; best mean first."""
        runs: dict[str, list[dict]] = {}
        for r in self.trials.values():
            if r.get(CONFIRM_OF) and r["status"] == "COMPLETED" and _finite(r["metrics"].get(metric)):
                runs.setdefault(r[CONFIRM_OF], []).append(r)
        out = []
        for trial_id, rows in runs.items():
            values = [r["metrics"][metric] for r in rows]
            out.append({"trial_id": trial_id, "method": rows[0]["method"], "config": self.trials[trial_id]["config"],
                        "n": len(values), "mean": statistics.mean(values), "std": _std(values),
                        "seeds": sorted(r[SEED] for r in rows)})
        return sorted(out, key=lambda c: c["mean"], reverse=(mode == "max"))

    def selection(self, metric: str, mode: str) -> list[dict]:
        """The trials to train, best first: confirmed ones by their confirmed mean, then the
        other trials that ran to the end by ``metric``."""
        confirmed = [self.trials[c["trial_id"]] for c in self.confirmed(metric, mode)]
        return confirmed + [r for r in self.ranked(metric, mode) if r not in confirmed]

    def best_config(self, metric: str, mode: str) -> Optional[dict]:
        """The config to train (``best_config.yaml``): the first of :meth:`selection`."""
        best = self.best(metric, mode)
        return best["config"] if best else None

    def best(self, metric: str, mode: str) -> Optional[dict]:
        chosen = self.selection(metric, mode)
        return chosen[0] if chosen else None

    def pareto(self, objectives: list[str], mode: str) -> list[dict]:
        """The search's trials that ran to the end and that no other such trial beats on every
        objective (each objective following ``mode``), by the first objective, best first."""
        rows = [r for r in self.ranked(objectives[0], mode)
                if all(_finite(r["metrics"].get(m)) for m in objectives)]
        points = [[r["metrics"][m] for m in objectives] for r in rows]
        return [rows[i] for i in sorted(pareto_front(points, mode == "max"))]

    def leaderboard(self, metric: str, mode: str) -> list[dict]:
        """The best trial per recipe (its preset, or its parts if composed freely) by ``metric``
        (completed trials first, then any). Confirmed trials come first, each of them, by their
        confirmed mean."""
        best: dict[str, dict] = {}
        for r in self.ranked(metric, mode, completed_only=False):
            cur = best.get(r["method"])
            if cur is None or (cur["status"] != "COMPLETED" and r["status"] == "COMPLETED"):
                best[r["method"]] = r
        confirmed = [self.trials[c["trial_id"]] for c in self.confirmed(metric, mode)]
        rest = sorted((r for r in best.values() if r not in confirmed),
                      key=lambda r: r["metrics"][metric], reverse=(mode == "max"))
        return confirmed + rest

    def write_csv(self, path: Path) -> None:
        keys = sorted({k for r in self.trials.values() for k in flatten(r["config"])})
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["trial_id", "method", "status", "epochs", "total_epochs", "rungs", "node_id",
                        CONFIRM_OF, SEED, *SCALAR_METRICS, *keys])
            for r in self.trials.values():
                flat = flatten(r["config"])
                w.writerow([r["trial_id"], r["method"], r["status"], r.get("epochs"),
                            r.get("total_epochs"), rungs_text(r), r.get("node_id"), r.get(CONFIRM_OF), r.get(SEED),
                            *[r["metrics"].get(m) for m in SCALAR_METRICS],
                            *[flat.get(k) for k in keys]])


def pareto_front(points: list[list[float]], maximize: bool = True) -> list[int]:
    """Indices of the points that no other point dominates (as good on every coordinate and
    better on one); equal points are all kept."""
    sign = 1.0 if maximize else -1.0
    pts = [[sign * v for v in p] for p in points]

    def dominates(q, p):
        return all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))

    return [i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)]


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def format_leaderboard(rows: list[dict], metric: str, groups: str = "",
                       confirmed: Optional[list[dict]] = None) -> str:
    """The table, then ``groups``: which many/medium/few split its columns use. With
    ``confirmed`` (:meth:`TrialRecords.confirmed`), a column of each trial's mean ± std over
    its confirmation seeds."""
    width = max([12] + [len(r["method"]) for r in rows])
    by_trial = {c["trial_id"]: c for c in confirmed or []}
    head = f"{'method':<{width}} {'trial':<10} {'status':<9} {'epochs':>6} {metric:>18} " \
           f"{'test top1':>9} {'many':>6} {'medium':>6} {'few':>6}" + \
           (f"  {'confirmed mean ± std (seeds)':>28}" if by_trial else "")
    lines = [head, "-" * len(head)]

    def f(v, w=6):
        return f"{v:>{w}.3f}" if _finite(v) else f"{'-':>{w}}"

    for r in rows:
        m = r["metrics"]
        c = by_trial.get(r["trial_id"])
        shown = f"{c['mean']:.3f} ± {c['std']:.3f} ({c['n']})" if c else "-"
        lines.append(f"{r['method']:<{width}} {r['trial_id'][-10:]:<10} {r['status']:<9} "
                     f"{r.get('epochs', 0):>6} {f(m.get(metric), 18)} {f(m.get('test/top1'), 9)} "
                     f"{f(m.get('test/many'))} {f(m.get('test/medium'))} {f(m.get('test/few'))}"
                     + (f"  {shown:>28}" if by_trial else ""))
    return "\n".join(lines + ([groups] if groups else []))


TAG_SEARCH = "ltsearch.search_dir"  # (MLflow tags, and an exported config's origin lines)
TAG_TRIAL = "ltsearch.trial_id"


def write_config(config: dict, path: Path, origin: Optional[dict] = None) -> None:
    """``config`` as YAML, headed by ``# key: value`` comments of where it came from (the
    search and trial: :func:`ltsearch.runconfig.config_origin` reads them back)."""
    header = "".join(f"# {k}: {v}\n" for k, v in (origin or {}).items() if v is not None)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))


def origin_of(folder: Path, record: dict) -> dict:
    return {TAG_SEARCH: str(Path(folder).resolve()), TAG_TRIAL: record.get("trial_id")}


def error_text(trial) -> Optional[str]:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines()
        return text[-1] if text else None
    except OSError:
        return None
