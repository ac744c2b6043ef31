"""The benchmark suite's closing table (bench/timing.py), built from rows without a GPU: every
row shows its time, rate and % of the card's ceiling, a figure above 100% is marked as a
measurement bug, and a PyTorch peer is shown with our time for the same work.

Run:  pytest tests/test_bench_table.py
"""
from bench import timing


def test_table_marks_figures_above_the_ceiling(monkeypatch):
    rows = [
        {"name": "test_bench_gelu[bf16-forward]", "ms": 0.25, "rate": "3900 GB/s", "frac": 0.93,
         "peers": [("torch_gelu", 0.30, 0.25)], "info": {}},
        {"name": "test_bench_encoder[bf16-forward]", "ms": 0.05, "rate": "5200 GB/s",
         "frac": 1.08, "peers": [("torch_x", None, 0.05)], "info": {}},
        {"name": "test_bench_attention[flash-forward]", "ms": 0.3, "rate": "410.0 TFLOP/s",
         "frac": 0.55, "peers": [], "info": {}},
    ]
    monkeypatch.setattr(timing, "ROWS", rows)
    lines = timing.table()
    assert lines[0].split()[:5] == ["kernel", "ms", "rate", "%", "ceiling"]
    gelu, enc, attn = lines[1:4]
    assert "93.0%" in gelu and "!" not in gelu
    assert "torch_gelu 0.3000 ms (ours 0.2500, 1.20x)" in gelu
    assert "108.0% !" in enc and "torch_x failed" in enc
    assert "55.0%" in attn and "410.0 TFLOP/s" in attn
    assert lines[-1].startswith("! above this card's measured ceiling")


def test_no_rows_no_table(monkeypatch):
    monkeypatch.setattr(timing, "ROWS", [])
    assert timing.table() == []
    assert timing.measured_ceilings() is None  # nothing was measured in this process


def test_ceilings_describe():
    c = timing.Ceilings("NVIDIA H200", 60 << 20, 4.0e12, 4.4e12, 4.3e12,
                        {"bf16": 750e12, "fp32": 55e12})
    assert c.bytes_per_s == 4.4e12
    text = c.describe()
    assert "memory 4.40 TB/s (copy 4.00, read 4.40, write 4.30)" in text
    assert "bf16 750 TFLOP/s, fp32 55.0 TFLOP/s" in text and "L2 60 MiB" in text
