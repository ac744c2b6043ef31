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


def test_alternate_rotates_and_takes_medians(monkeypatch):
    """Each round times every callable once, starting one further along; medians per name."""
    order = []
    fake = {"ours": [3.0, 1.0, 2.0], "peer": [5.0, 4.0, 9.0]}

    def cuda_time(fn, warmup, iters):
        order.append(fn.__name__)
        return fake[fn.__name__].pop(0)

    def ours():
        pass

    def peer():
        pass
    monkeypatch.setattr(timing, "cuda_time", cuda_time)
    med = timing.alternate({"ours": ours, "peer": peer}, rounds=3)
    assert order == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert med == {"ours": 2.0, "peer": 5.0}


def test_torch_peer_in_alternation_records_both_medians(monkeypatch):
    times = iter([1.0, 2.0, 2.2, 1.1, 0.9, 2.4])  # ours, peer, peer, ours, ours, peer

    monkeypatch.setattr(timing, "cuda_time", lambda fn, warmup, iters: next(times))
    row = {"name": "x", "ms": 1.05, "rate": "", "frac": None, "peers": [], "info": {}}
    monkeypatch.setattr(timing, "ROWS", [row])
    ms = timing.torch_peer(row["info"], "sdpa", lambda: (lambda: None), 1.05,
                           ours_fn=lambda: None)
    assert ms == 2.2
    assert row["info"]["ours_ms_beside_sdpa"] == 1.0
    assert row["info"]["speedup_vs_sdpa"] == 2.2
    assert row["peers"] == [("sdpa", 2.2, 1.0)]
