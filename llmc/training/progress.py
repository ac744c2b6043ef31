"""Progress a person reads at a glance: tokens done of total, elapsed, ETA and finish time.

`Progress(total_steps, tokens_per_step, start_step)` is told each finished step's duration and
returns the tail of the step line, e.g.
    | 1.31M/3.93M tok (33%) | 0:01:02 elapsed | ETA 0:02:04, done ~14:05
The rate is the mean over the steps of this process except the first (which includes compile
and allocation time), so the ETA settles after a couple of steps. `summary()` is the one-line
report at the end of the run.

Run the tests:  python -m pytest tests/test_long_runs.py -q -k progress
"""
from __future__ import annotations

import time


def hms(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d}d " if d else "") + f"{h}:{m:02d}:{s:02d}"


def si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class Progress:
    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0, clock=time.time):
        self.total, self.tps, self.start = total_steps, tokens_per_step, start_step
        self.clock = clock
        self.t0 = clock()
        self.done = start_step
        self.timed_s, self.timed_steps = 0.0, 0

    def step(self, seconds: float) -> None:
        """One more step finished, taking `seconds`."""
        if self.done > self.start:  # the first step of a process pays for compiles; not counted
            self.timed_s += seconds
            self.timed_steps += 1
        elif self.total - self.start == 1:
            self.timed_s, self.timed_steps = seconds, 1
        self.done += 1

    def eta_s(self) -> float | None:
        if self.timed_steps == 0:
            return None
        return (self.total - self.done) * self.timed_s / self.timed_steps

    def line(self) -> str:
        """' | tokens done/total (pct) | elapsed | ETA, finish time' for the step line."""
        tokens, total = self.done * self.tps, self.total * self.tps
        out = (f" | {si(tokens)}/{si(total)} tok ({100 * self.done / self.total:.0f}%)"
               f" | {hms(self.clock() - self.t0)} elapsed")
        eta = self.eta_s()
        if eta is None:
            return out + " | ETA ?"
        finish = time.strftime("%H:%M" if eta < 86400 else "%a %H:%M", time.localtime(self.clock() + eta))
        return out + f" | ETA {hms(eta)}, done ~{finish}"

    def summary(self) -> str:
        steps = self.done - self.start
        elapsed = self.clock() - self.t0
        rate = steps * self.tps / elapsed if elapsed > 0 else 0.0
        return (f"{steps} steps ({self.start}->{self.done} of {self.total}), "
                f"{si(steps * self.tps)} tokens in {hms(elapsed)} ({rate:,.0f} tok/s overall)")
