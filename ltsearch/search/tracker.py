"""What a search records outside its folder, behind one small interface.

The driver and its Tune callback speak only to a :class:`Tracker`: start the search, start a
trial, log a trial's epoch, end a trial, end the search. MLflow is today's one implementation
(:mod:`ltsearch.search.tracking`); the base class records nothing (``search.tracking: none``).
:class:`BackgroundTracker` runs any tracker's calls in order on one thread, so Tune's event loop
never waits for a tracking server; ``end_search`` drains it first, so nothing is lost.

Statuses are the records' words: a trial ends ``COMPLETED``, ``PRUNED``, ``FAILED`` or
``INTERRUPTED``; a search ``finished``, ``interrupted`` or ``failed``.
"""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class TrackingError(Exception):
    """A tracking store that was reached failed a call (it could not keep the files, or went
    away mid-call); the message is one line."""


class Tracker:
    """Records nothing: a search with tracking turned off."""

    uri = ""
    search_id = ""  # the search's record, once started

    def start_search(self, folder: Path, name: str, params: dict) -> None:
        """Open (or, for a resumed search, reopen) the search's record."""

    def start_trial(self, trial_id: str, label: str, config: dict, tags: Optional[dict] = None) -> None:
        """Open the trial's record (reopen it on resume, keeping the epochs it holds); ``tags``
        mark a confirmation run."""

    def log(self, trial_id: str, step: int, metrics: dict) -> None:
        """One epoch's scalar metrics; a step already recorded is skipped."""

    def wait_trial(self, trial_id: str, waiting: bool) -> None:
        """The trial's rungs paused it (it holds no worker), or it goes on."""

    def end_trial(self, trial_id: str, status: str, config: dict, result: dict,
                  error: Optional[str] = None) -> None:
        """Close the trial's record; ``result`` is its last report (per-class lists included)."""

    def catch_up(self, trial_id: str, label: str, config: dict, status: str, reports: list[dict],
                 error: Optional[str] = None, tags: Optional[dict] = None) -> None:
        """Make the record of a trial that ended agree with the search folder: on a resume after
        the driver or the tracking server was lost with calls still queued. ``reports``: each
        epoch's scalar metrics with its ``epoch``, then the last report in full."""
        self.start_trial(trial_id, label, config, tags)
        for report in reports:
            self.log(trial_id, int(report.get("epoch", 0)), report["metrics"])
        self.end_trial(trial_id, status, config, reports[-1]["result"] if reports else {}, error)

    def end_search(self, ending: str, artifacts: list[Path]) -> None:
        """Close the search's record and every trial record still open; ``artifacts``: files,
        and folders kept under their own name, to attach to the search's record."""

    def attach(self, folder: Path, paths: list[Path]) -> None:
        """Attach files to the record of the search in ``folder``, after it ended (a report
        written later); :class:`TrackingError` if the store fails to keep them."""

    def unreachable(self) -> Optional[str]:
        """Why the store cannot be reached now, in one line, or None when it answers."""
        return None

    def answered(self) -> None:
        """A call went through (after an outage, the store is back)."""

    def describe(self) -> str:
        """One line for the summary: where to look at the records."""
        return "tracking: off"


class BackgroundTracker(Tracker):
    """Calls ``inner`` on a thread, in order. A call that raises stops the thread; the error is
    raised to the caller at its next call, as if the call had been direct."""

    def __init__(self, inner: Tracker):
        self.inner = inner
        self.uri = inner.uri
        self.error: Optional[BaseException] = None
        self._calls: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    @property
    def search_id(self) -> str:
        return self.inner.search_id

    def start_search(self, *args) -> None:
        """Queued like the rest: a fresh store's set-up overlaps Ray's start."""
        self._put(self.inner.start_search, *args)

    def _put(self, method, *args) -> None:
        if self.error is not None:
            raise self.error
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="tracker", daemon=True)
            self._thread.start()
        self._calls.put((method, args))

    def _work(self) -> None:
        while True:
            method, args = self._calls.get()
            try:
                if method is not None and self.error is None:
                    method(*args)
                    self.inner.answered()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = e
                why = self.inner.unreachable()  # the store went away: say so in one line
                if why:
                    self.error = TrackingError(why)
                    self.error.__cause__ = e
            finally:
                self._calls.task_done()
            if method is None:
                return

    def start_trial(self, *args) -> None:
        self._put(self.inner.start_trial, *args)

    def log(self, *args) -> None:
        self._put(self.inner.log, *args)

    def wait_trial(self, *args) -> None:
        self._put(self.inner.wait_trial, *args)

    def end_trial(self, *args) -> None:
        self._put(self.inner.end_trial, *args)

    def catch_up(self, *args) -> None:
        self._put(self.inner.catch_up, *args)

    def drain(self) -> None:
        """Wait until every queued call has run; raise the first error."""
        if self._thread is not None:
            self._calls.join()
        if self.error is not None:
            raise self.error

    def end_search(self, ending: str, artifacts: list[Path]) -> None:
        """Run what is queued, then close: a call that failed (a server that came back, say)
        must not leave the search's record open. A store that does not answer now is not
        waited for (each queued call would retry it for minutes): :class:`TrackingError`, and
        ``--resume`` catches the records up once it is back."""
        why = self.inner.unreachable()
        if why:
            raise TrackingError(why)
        try:
            self.drain()
        except Exception as e:
            log.warning("a tracking call failed (%s: %s); closing the records anyway",
                        type(e).__name__, e)
        finally:
            if self._thread is not None:
                self._calls.put((None, ()))
                self._thread.join()
                self._thread = None
        self.inner.end_search(ending, artifacts)

    def describe(self) -> str:
        return self.inner.describe()


def make_tracker(kind: str, uri: Optional[str], experiment: str, classes: list[str],
                 counts: list[int], background: bool = True) -> Tracker:
    """The tracker ``search.tracking`` names, checked (a tracking server must answer)."""
    if kind == "none":
        return Tracker()
    from ltsearch.search import tracking

    tracker = tracking.MLflowTracker.checked(uri, experiment, classes, counts)
    return BackgroundTracker(tracker) if background else tracker
