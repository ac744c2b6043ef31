"""bench/e2e.py's arguments and its ratio lines, from made-up results (no GPU): the comma lists,
and every llmc run paired with the peer, the eager run and the bf16 run of its own (B,
recompute, classifier chunks).

Run:  pytest tests/test_e2e_cli.py
"""
import pytest

from bench import e2e


def test_comma_lists():
    args = e2e.parse_args(["--batch-size", "16,64", "--classifier-chunks", "1,4,8"])
    assert args.batch_size == [16, 64]
    assert args.classifier_chunks == [1, 4, 8]
    assert args.torch_batch_size == [16, 64]
    assert e2e.parse_args([]).classifier_chunks == [1]


@pytest.mark.parametrize("argv", [["--classifier-chunks", "0"], ["--classifier-chunks", "4,x"],
                                  ["--batch-size", "0"], ["--recompute", "2"], ["--steps", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        e2e.parse_args(argv)


def _run(name, B, tps, mem, chunks=1, graphs=True, fp8=False, recompute=0):
    return {"name": name, "B": B, "tokens_per_s": tps, "ms_per_step": B * 1024 / tps * 1e3,
            "mem_device_bytes": mem, "graphs": graphs, "fp8": fp8, "recompute": recompute,
            "classifier_chunks": chunks, "mem_fp8_bytes": 0, "fp8_dgelu_fused": True,
            "fp8_stats": {}}


def test_ratios_pair_runs_of_the_same_chunks():
    results = {"graphs": True, "llmc": [
        _run("llmc B=64", 64, 600_000, 28e9),
        _run("llmc B=64 c8", 64, 590_000, 23e9, chunks=8),
        _run("llmc B=64 c8 eager", 64, 580_000, 23e9, chunks=8, graphs=False),
        _run("llmc B=64 c8 fp8", 64, 649_000, 22e9, chunks=8, fp8=True)],
        "torch": [_run("torch B=64 compile", 64, 500_000, 40e9)]}
    texts = [q["text"] for q in e2e.ratios(results)]
    assert "llmc B=64 / torch B=64 compile: tokens/s x1.200, memory x0.700" in texts
    assert "llmc B=64 c8 / torch B=64 compile: tokens/s x1.180, memory x0.575" in texts
    # the eager run is compared with the graphed run of 8 chunks, not with the one of 1 chunk
    gap = [q for q in e2e.ratios(results) if "eager" in q]
    assert [(q["llmc"], q["eager"]) for q in gap] == [("llmc B=64 c8", "llmc B=64 c8 eager")]
    fp8 = [q for q in e2e.ratios(results) if "bf16" in q]
    assert [(q["llmc"], q["bf16"]) for q in fp8] == [("llmc B=64 c8 fp8", "llmc B=64 c8")]
    assert fp8[0]["tokens_per_s"] == pytest.approx(1.1)
