"""llm.c's outlier guard: z-scores of the loss and the gradient norm over a moving window.

    z = (x - mean(window)) / std(window)        window: the last `window` steps' values

`OutlierDetector.update(x)` returns the z-score of x against the window *before* x joins it
(NaN until the window is full, as llm.c's `update_detector`), then slides the window. With
`--skip-update-lossz Z` (or `--skip-update-gradz Z`) a step whose loss (norm) z-score is above Z
keeps its weights and optimizer moments: the gradient is computed, logged and dropped. Both
z-scores are written to metrics.jsonl (`lossz`, `gradz`) together with `skipped`.

The detectors' windows are part of the checkpoint (`state_dict`), so a resumed run makes the
same decisions as an uninterrupted one. Values are kept as Python floats (float64) and the sums
are recomputed from the window each step (a few hundred numbers): no drift from running sums.

Run the tests:  python -m pytest tests/test_long_runs.py tests/test_zero.py -q -k "guard or outlier or skip"
"""
from __future__ import annotations

import math
from collections import deque

WINDOW = 128  # llm.c's OUTLIER_DETECTOR_WINDOW_SIZE


class OutlierDetector:
    def __init__(self, window: int = WINDOW):
        if window < 2:
            raise ValueError(f"the outlier window must hold >= 2 values, got {window}")
        self.window = window
        self.values = deque(maxlen=window)

    def update(self, x: float) -> float:
        """z-score of x against the current window (NaN while it fills); then x joins it."""
        x = float(x)
        z = math.nan
        if len(self.values) == self.window:
            n = len(self.values)
            mean = math.fsum(self.values) / n
            var = math.fsum((v - mean) ** 2 for v in self.values) / n
            std = math.sqrt(var)
            z = (x - mean) / std if std > 0 else (0.0 if x == mean else math.inf)
        if math.isfinite(x):  # a NaN loss must not poison every later z-score
            self.values.append(x)
        return z

    def state_dict(self) -> dict:
        return {"window": self.window, "values": list(self.values)}

    def load_state_dict(self, d: dict) -> None:
        if not isinstance(d, dict) or d.get("window") != self.window or \
                not isinstance(d.get("values"), list):
            raise ValueError(f"outlier detector state {str(d)[:80]!r} does not fit a window of "
                             f"{self.window}")
        self.values = deque((float(v) for v in d["values"]), maxlen=self.window)


class OutlierGuard:
    """The two detectors and the skip thresholds (0 or None: never skip on that signal)."""

    def __init__(self, lossz: float | None, gradz: float | None, window: int = WINDOW):
        self.lossz_limit, self.gradz_limit = lossz or 0.0, gradz or 0.0
        self.loss, self.grad = OutlierDetector(window), OutlierDetector(window)

    @property
    def active(self) -> bool:
        """True when some step could be skipped (the norm must then be known before the update)."""
        return self.lossz_limit > 0 or self.gradz_limit > 0

    def check(self, loss: float, norm: float) -> tuple:
        """(skip, lossz, gradz) for a step with this loss and pre-clip gradient norm."""
        lz, gz = self.loss.update(loss), self.grad.update(norm)
        skip = (self.lossz_limit > 0 and lz > self.lossz_limit) or \
               (self.gradz_limit > 0 and gz > self.gradz_limit)
        return bool(skip), lz, gz

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "grad": self.grad.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.loss.load_state_dict(d["loss"])
        self.grad.load_state_dict(d["grad"])
