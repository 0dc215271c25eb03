"""The end of every search, whatever stopped it: the records closed in agreement (trials.json,
the Optuna study, MLflow), then the leaderboard, trials.csv, ``best_config.yaml`` and the report
from what finished.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ltsearch.search.opened import Search
from ltsearch.search.records import LIVE, ONGOING, TrialRecords

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    folder: Path
    records: TrialRecords
    best_config: Optional[Path]
    leaderboard: str
    parent_run_id: str
    tracking_uri: str
    ending: str = "finished"  # finished | interrupted | failed
    tracking: str = ""  # where to look: one line
    report: Optional[Path] = None  # report.html
    signal: Optional[int] = None  # the stop signal that ended it (SIGINT, SIGTERM, SIGHUP), if any
    unclosed: list = field(default_factory=list)  # records the ending could not write (a full disk)


class SearchStopped(Exception):
    """The search ended before its last trial (Ctrl-C, or an error in the driver); everything
    recorded is closed and ``--resume`` continues it."""

    def __init__(self, outcome: SearchOutcome, cause: Optional[BaseException] = None):
        self.outcome = outcome
        self.cause = cause
        super().__init__(outcome.ending)


def finish_search(search: Search, ending: str, cause: Optional[BaseException] = None) -> SearchOutcome:
    """Always runs. Finished: trials Tune never recorded (a driver killed between snapshots) are
    LOST and their Optuna trials FAIL. Interrupted or failed: running trials are INTERRUPTED
    in trials.json and WAITING in Optuna (``--resume`` continues them), their MLflow runs
    KILLED. Then the leaderboard, trials.csv and best_config.yaml from what finished. A record
    that cannot be written (a full disk) does not stop the others from closing: what stayed
    open is in the outcome's ``unclosed``."""
    import optuna

    from ltsearch.search.records import format_leaderboard, origin_of, write_config
    from ltsearch.search.report import FIGURES

    settings = search.space.settings
    unclosed: list[str] = []

    def attempt(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:  # a full or lost disk: say which record, close the rest
            unclosed.append(f"{what} ({e.strerror or e})")
        except Exception as e:  # the study's sqlite on a full disk: "database or disk is full"
            if not _disk_error(e):
                raise
            unclosed.append(f"{what} (its database could not be written)")

    records = search.records
    running = [k for k, r in records.trials.items() if r["status"] in LIVE]
    open_optuna = []
    if (search.folder / "optuna.db").is_file():
        try:
            study = search.study()
        except KeyError:  # the search stopped before its study was created (Ray did not start)
            study = None
        if study is not None:
            open_optuna = [t.number for t in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if ending == "finished":
        # Trials Tune never recorded (started after its last snapshot, then the driver stopped)
        # cannot be continued: RUNNING after a killed driver, INTERRUPTED after a stopped one.
        for trial_id, r in records.trials.items():
            if r["status"] in ONGOING and trial_id not in search.tune_trial_ids:
                attempt(str(records.path), records.update, trial_id, status="LOST",
                        error="the driver stopped before Ray recorded this trial; it was not resumed")
        study = search.study() if open_optuna else None
        for number in open_optuna:
            attempt(f"the Optuna study {search.folder / 'optuna.db'}", study.tell, number,
                    state=optuna.trial.TrialState.FAIL)
    else:
        for trial_id in running:
            attempt(str(records.path), records.update, trial_id, status="INTERRUPTED")
        attempt(f"the Optuna study {search.folder / 'optuna.db'}", search.set_trial_states,
                open_optuna, optuna.trial.TrialState.WAITING)

    confirmed = records.confirmed(settings.metric, settings.mode)
    rows = records.leaderboard(settings.metric, settings.mode)
    board = format_leaderboard(rows, settings.metric, search.groups, confirmed)
    attempt(str(search.folder / "leaderboard.txt"), (search.folder / "leaderboard.txt").write_text, board + "\n")
    attempt(str(search.folder / "trials.csv"), records.write_csv, search.folder / "trials.csv")
    best = records.best(settings.metric, settings.mode)
    best_path = None
    if best is not None:
        best_path = search.folder / "best_config.yaml"
        attempt(str(best_path), write_config, best["config"], best_path, origin_of(search.folder, best))
    elif ending == "finished":
        log.warning("no trial ran to the end; best_config.yaml not written")
    artifacts = [search.folder / "search.yaml", search.folder / "leaderboard.txt",
                 search.folder / "trials.csv"] + ([best_path] if best_path else [])
    report = _write_report(search.folder) if settings.report and records.trials and not unclosed else None
    if report is not None:
        artifacts += [report, report.parent / FIGURES]
    try:
        search.tracker.end_search(ending, artifacts)
    except Exception as e:  # a lost tracking server must not hide the search's own ending
        log.warning("tracking records not closed (%s: %s); --resume reopens them", type(e).__name__, e)
    return SearchOutcome(search.folder, records, best_path, board, search.tracker.search_id,
                         search.tracker.uri, ending, search.tracker.describe(), report,
                         search.stops.received if search.stops is not None else None, unclosed)


def _disk_error(e: Optional[BaseException | str]) -> bool:
    """A database error that is the disk's (sqlite: "database or disk is full", "disk I/O error"),
    in ``e``'s chain (or said by a message)."""
    while e is not None:  # Optuna wraps sqlalchemy's error, which wraps sqlite3's
        text = str(e).lower()
        if "disk is full" in text or "disk i/o error" in text or "no space left" in text:
            return True
        e = None if isinstance(e, str) else e.__cause__ or e.__context__
    return False


def _write_report(folder: Path) -> Optional[Path]:
    """The search's report page; a report that fails must not hide the search's ending."""
    from ltsearch.search.report import write_report

    try:
        return write_report(folder)
    except Exception as e:
        log.warning("report not written (%s: %s); `ltsearch report %s` tries again",
                    type(e).__name__, e, folder)
        return None
