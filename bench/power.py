"""The card's SM clock and power draw while a benchmark runs: nvidia-smi, sampled in the background.

    sampler = PowerSampler.start(device)   # None when nvidia-smi is not there
    t0 = time.monotonic(); ...timed work...; t1 = time.monotonic()
    sampler.window(t0, t1) -> {"samples", "sm_mhz", "power_w", "power_limit_w", "power_capped"}
    sampler.stop()

Why: training GPT-2 124M keeps an H200 at its 700 W limit, and the card then lowers its SM clock
(1.4-1.7 GHz instead of its 1.98 GHz maximum, seen under bench/e2e.py at B=16-64): tokens/s
follows the energy a step takes, and the same code measures a few percent apart from one machine
start to the next. The clock and power beside each figure say which regime it was measured in.
`power_capped` is the share of samples whose clock-event reasons include the software power cap
(nvidia-smi's clocks_event_reasons.active bit 0x4) or a hardware power brake (0x80).
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

QUERY = "clocks.sm,power.draw,power.limit,clocks_event_reasons.active"
POWER_CAP_BITS = 0x4 | 0x80  # SW power cap, HW power brake slowdown


def parse_line(line: str):
    """One `--format=csv,noheader,nounits` line of QUERY -> (sm_mhz, power_w, limit_w, reasons)
    or None (a header, a blank or an "[N/A]" field)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        return float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3], 16)
    except ValueError:
        return None


def summarize(samples: list):
    """[(t, sm_mhz, power_w, limit_w, reasons)] -> the window's summary (module docstring), or
    None without samples."""
    if not samples:
        return None
    return {"samples": len(samples),
            "sm_mhz": statistics.mean(s[1] for s in samples),
            "power_w": statistics.mean(s[2] for s in samples),
            "power_limit_w": statistics.median(s[3] for s in samples),
            "power_capped": sum(1 for s in samples if s[4] & POWER_CAP_BITS) / len(samples)}


def describe(card) -> str:
    """A summary as one short text: '1,540 MHz 689 W/700 (capped 92%)'."""
    if not card:
        return ""
    return (f"{card['sm_mhz']:,.0f} MHz {card['power_w']:.0f} W/{card['power_limit_w']:.0f} "
            f"(capped {100 * card['power_capped']:.0f}%)")


class PowerSampler:
    """nvidia-smi in loop mode on one device; a thread keeps (time.monotonic(), sample) pairs."""

    def __init__(self, proc):
        self.proc = proc
        self.samples = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, device="0", interval_ms: int = 200):
        """device: what nvidia-smi's --id takes (an index in its own order, or a PCI bus id: with
        CUDA_VISIBLE_DEVICES set only the bus id names the same card as CUDA)."""
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        try:
            proc = subprocess.Popen(
                [exe, f"--id={device}", f"--query-gpu={QUERY}",
                 "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return None
        return cls(proc)

    def _read(self):
        for line in self.proc.stdout:
            s = parse_line(line)
            if s is not None:
                with self.lock:
                    self.samples.append((time.monotonic(),) + s)

    def window(self, t0: float, t1: float):
        """The summary of the samples taken between monotonic times t0 and t1 (None if none)."""
        with self.lock:
            inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return summarize(inside)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
