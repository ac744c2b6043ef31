"""bench/power.py: nvidia-smi's samples parsed and summarized, and the sampler's window, with a
stand-in nvidia-smi on PATH (no GPU); bench/e2e.py's report line for them.

Run:  pytest tests/test_power.py
"""
import os
import stat
import time

import pytest

from bench import e2e, power


def test_parse_line():
    assert power.parse_line("1545, 689.90, 700.00, 0x0000000000000004\n") == \
        (1545.0, 689.9, 700.0, 4)
    assert power.parse_line("1980, 124.5, 700.00, 0x0000000000000000") == (1980.0, 124.5, 700.0, 0)
    for bad in ("", "clocks.sm [MHz], power.draw [W]", "[N/A], 120.0, 700.0, 0x0",
                "1980, 124.5, 700.0"):
        assert power.parse_line(bad) is None


def test_summarize_counts_power_capped_samples():
    samples = [(0.0, 1500.0, 690.0, 700.0, 0x4), (0.2, 1980.0, 300.0, 700.0, 0x0),
               (0.4, 1600.0, 700.0, 700.0, 0x80 | 0x1), (0.6, 1980.0, 310.0, 700.0, 0x1)]
    s = power.summarize(samples)
    assert s["samples"] == 4
    assert s["sm_mhz"] == pytest.approx(1765.0)
    assert s["power_w"] == pytest.approx(500.0)
    assert s["power_limit_w"] == 700.0
    assert s["power_capped"] == 0.5  # 0x4 and 0x80 count, 0x1 (idle) does not
    assert power.summarize([]) is None
    assert power.describe(s) == "1,765 MHz 500 W/700 (capped 50%)"
    assert power.describe(None) == ""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """An nvidia-smi that prints a header-less sample every 20 ms until stopped, and records its
    arguments."""
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                   "while true; do echo '1500, 690.5, 700.00, 0x0000000000000004'; "
                   "sleep 0.02; done\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_sampler_window_and_stop(fake_smi):
    s = power.PowerSampler.start("00000000:19:00.0", interval_ms=20)
    assert s is not None
    try:
        t0 = time.monotonic()
        deadline = t0 + 5
        while time.monotonic() < deadline:
            time.sleep(0.05)
            w = s.window(t0, time.monotonic())
            if w and w["samples"] >= 3:
                break
        assert w["samples"] >= 3 and w["sm_mhz"] == 1500.0 and w["power_capped"] == 1.0
        assert s.window(t0 - 100, t0 - 50) is None  # nothing in a window before it started
    finally:
        s.stop()
    assert s.proc.poll() is not None
    args = (fake_smi / "args").read_text()
    assert "--id=00000000:19:00.0" in args and "--loop-ms=20" in args
    assert f"--query-gpu={power.QUERY}" in args


def test_no_nvidia_smi_no_sampler(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert power.PowerSampler.start() is None


def test_e2e_report_lists_each_runs_card():
    card = {"samples": 90, "sm_mhz": 1540.0, "power_w": 689.0, "power_limit_w": 700.0,
            "power_capped": 0.92}
    run = {"name": "llmc B=64", "tokens_per_s": 600_000.0, "ms_per_step": 109.2, "mfu": 0.49,
           "mem_device_bytes": 23.9e9, "first_loss": 10.8, "last_loss": 10.6, "card": card}
    peer = dict(run, name="torch B=64 compile", card=None)
    text = e2e.report({"device": "H200", "model": "d12", "T": 1024, "grad_accum": 1,
                       "steps": 20, "llmc": [run], "torch": [peer], "ratios": []})
    assert "llmc B=64                1,540 MHz 689 W/700 (capped 92%)" in text
    assert "torch B=64 compile       no samples" in text
    no_card = e2e.report({"device": "H200", "model": "d12", "T": 1024, "grad_accum": 1,
                          "steps": 20, "llmc": [dict(run, card=None)], "torch": [],
                          "ratios": []})
    assert "SM clock" not in no_card
    assert e2e.parse_args(["--no-card"]).card is False and e2e.parse_args([]).card is True
