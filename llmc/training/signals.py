"""Preemption: SIGTERM and SIGINT stop a run at the next step boundary, with a checkpoint.

Slurm, Kubernetes and cloud spot instances send SIGTERM some seconds before they kill a job;
a person at the terminal presses Ctrl-C (SIGINT). `StopRequest` turns either into a flag that
the training loop reads after each step: it finishes the step, saves a checkpoint, and exits
with PREEMPTED_EXIT = 75 (EX_TEMPFAIL in sysexits.h: "try again later"; schedulers and retry
loops read it as "requeue me"), printing what was saved and how to resume. A second SIGINT
aborts at once (KeyboardInterrupt) for someone who does not want to wait for the save.

Under `python -m llmc.launch` the launcher forwards the signal to every rank, but not at the
same instant; the ranks agree on the stop step through `backend.any_rank(flag)` (an all-reduce
of the flag at each step boundary on the GPU path), so all of them save the same step.

Run the tests:  python -m pytest tests/test_preemption.py -q
"""
from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run stopped on a signal after saving; str() says what was saved and how to resume."""


class StopRequest:
    """Catches SIGTERM/SIGINT while installed; `.signal` is the first one received (or None)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def _handle(self, signum, _frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        if self.signal is None:
            self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
