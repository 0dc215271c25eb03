"""SIGTERM and SIGHUP stop a search the way Ctrl-C does.

``timeout``, Slurm, Kubernetes and ``ray job stop`` stop a job with SIGTERM; a closed terminal
sends SIGHUP. Left to Ray, the first aborts the driver (``ray.init`` installs handlers that exit
at once, and its core worker's fatal-signal handler dumps stacks and exits 134) with trials and
tracking runs left RUNNING. Here each is handed to whatever handles SIGINT at that moment
(Tune's handler: finish the current step, save the experiment, return), so every stop goes
through the same ending. While the records are being closed, a stop of any kind only waits.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Optional

STOPS = (signal.SIGTERM, signal.SIGHUP)
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


@contextlib.contextmanager
def spared_children():
    """Processes started inside (a local Ray: its GCS, raylet, and the workers the raylet
    starts, which inherit its mask) never receive SIGTERM or SIGHUP, as Ray's own processes
    never receive SIGINT (``services.start_ray_process`` blocks it). A stop sent to the whole
    process group (``timeout``, a closed terminal, ``ray job stop``) or to every process of a
    job (Slurm) then reaches the driver alone, which stops the trials and closes the records
    with its Ray still up; without this the signal stopped that Ray too, and the driver waited a
    minute for it, then exited 1 with every record RUNNING. The cost: ``ray.shutdown``'s
    SIGTERM to each of those processes waits its second, then kills (~4 s)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSignals:
    """Installed for a command's whole run (and again after ``ray.init``, which replaces
    them); ``received``: the first stop signal that arrived, if any."""

    def __init__(self):
        self.received: Optional[int] = None
        self.closing = False
        self.saved: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        if self.closing:  # the records are being closed: they end in agreement first
            return
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)  # Tune's: it stops the experiment and saves it
        else:
            raise KeyboardInterrupt(NAMES.get(signum, str(signum)))

    def install(self) -> None:
        for sig in STOPS:
            previous = signal.signal(sig, self._handle)
            self.saved.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.saved.clear()

    @contextlib.contextmanager
    def closing_records(self):
        """Ctrl-C, SIGTERM and SIGHUP wait while the records close (else a second Ctrl-C would
        leave a trial RUNNING in one record and KILLED in another)."""
        saved_int = signal.getsignal(signal.SIGINT)
        self.closing = True
        signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            self.closing = False
            signal.signal(signal.SIGINT, saved_int)

    def exit_status(self) -> int:
        """An interrupted command's status: 128 + the signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
        return 128 + int(self.received or signal.SIGINT)

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
