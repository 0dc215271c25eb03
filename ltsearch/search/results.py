"""A search folder, read as it lies: its settings, its trials, every epoch each trial reported
and where the search's time went.

The report, ``ltsearch confirm`` and ``scripts/bench_search.py`` read a search through this
module, which imports neither Ray nor MLflow. Per-epoch numbers come from Ray's ``result.json``
files (one line per report, appended across resumes; the last line of an epoch wins); what the
driver saw (status, start and end) from ``trials.json``; the data's class counts and the
tracking store from ``search.json``, which the search writes when it starts.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ltsearch.config import ConfigError
from ltsearch.search.folder import damaged, read_json
from ltsearch.search.records import CONFIRM_OF, TRIALS_FILE, WAITED_S, TrialRecords

SEARCH_INFO = "search.json"
CONFIRM_PREFIX = "confirm-"  # Tune's experiment folders: ray/ (the search), confirm-N/ (its
                             # confirmation rounds)


@dataclass
class SearchResults:
    folder: Path
    space: object  # search.space.SearchSpace, from the folder's search.yaml
    records: TrialRecords
    info: dict  # search.json: name, tracking, classes, counts, groups, data
    reports: dict[str, list[dict]]  # trial id → its reports by epoch (list-valued keys only in the last)

    @classmethod
    def load(cls, folder: Path) -> "SearchResults":
        from ltsearch.search.space import load_search_file

        folder = Path(folder)
        if not (folder / TRIALS_FILE).is_file():
            raise ConfigError("search_dir", f"{folder} holds no {TRIALS_FILE}: not a search folder")
        space = load_search_file(folder / "search.yaml")
        return cls(folder, space, TrialRecords(folder), read_info(folder), read_reports(folder))

    @property
    def metric(self) -> str:
        return self.space.settings.metric

    @property
    def mode(self) -> str:
        return self.space.settings.mode

    def searched(self) -> list[dict]:
        """The search's own trials (not its confirmation runs), in the order they started."""
        rows = [r for r in self.records.trials.values() if not r.get(CONFIRM_OF)]
        return sorted(rows, key=lambda r: r.get("started_at") or 0.0)

    def time_spent(self) -> dict:
        """Where the search's slot time went, in seconds, from the first trial's start to the
        last one's end times the concurrent slots; ``efficiency`` is training's share."""
        rows = [r for r in self.searched() if r.get("started_at") and r.get("ended_at")]
        if not rows:
            return {}
        parts = {"training": 0.0, "evaluation": 0.0, "data + trainer build": 0.0,
                 "checkpoints + reports": 0.0, "worker start + scheduling": 0.0}
        for r in rows:
            reports = self.reports.get(r["trial_id"], [])
            last = reports[-1] if reports else {}
            inside = [sum(x.get("epoch_time_s", 0.0) for x in reports), last.get("time/eval_s", 0.0),
                      last.get("time/setup_s", 0.0), last.get("time/report_s", 0.0)]
            duration = r["ended_at"] - r["started_at"] - r.get(WAITED_S, 0.0)  # its slots' time
            for key, value in zip(parts, inside + [max(0.0, duration - sum(inside))]):
                parts[key] += value
        span = max(r["ended_at"] for r in rows) - min(r["started_at"] for r in rows)
        slots = span * self.space.settings.max_concurrent
        parts["idle slots"] = max(0.0, slots - sum(parts.values()))
        return {"parts": parts, "span_s": span, "slot_s": slots,
                "efficiency": parts["training"] / slots if slots > 0 else math.nan,
                "median_fixed_s": statistics.median(
                    r["ended_at"] - r["started_at"] - r.get(WAITED_S, 0.0)
                    - sum(x.get("epoch_time_s", 0.0) for x in self.reports.get(r["trial_id"], []))
                    for r in rows)}


def read_info(folder: Path) -> dict:
    """``search.json`` ({} for a folder from before it existed)."""
    info = read_json(Path(folder) / SEARCH_INFO, {})
    if not isinstance(info, dict):
        raise damaged(Path(folder) / SEARCH_INFO, "not a search's description")
    return info


def read_reports(folder: Path) -> dict[str, list[dict]]:
    """Each trial's reports from Ray's result.json files, one per epoch (a resumed trial's
    repeated epochs: the later line wins), sorted by epoch; list values (per-class accuracy,
    confusion) kept only in each trial's last report."""
    out: dict[str, dict[int, dict]] = {}
    folder = Path(folder)
    for experiment in [folder / "ray", *sorted(folder.glob(f"{CONFIRM_PREFIX}*"))]:
        for path in sorted(experiment.glob("*/result.json")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    result = json.loads(line)
                except ValueError:  # a line cut short by a killed process, or a blank one
                    continue
                if isinstance(result, dict) and "trial_id" in result:
                    out.setdefault(result["trial_id"], {})[int(result.get("epoch", 0))] = result
    reports = {}
    for trial_id, by_epoch in out.items():
        rows = [by_epoch[e] for e in sorted(by_epoch)]
        reports[trial_id] = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                             for r in rows[:-1]] + rows[-1:]
    return reports
