"""bench/kernel_profile.py's report, from made-up kernel records (no GPU): per-step kernel time,
launch count and gap time, the gap histogram, the pairs with the most gap time, the kernel table
slowest first; and its argument checks.

Run:  pytest tests/test_kernel_profile.py
"""
import pytest

from bench import kernel_profile


def test_report_sums_kernels_and_gaps_per_step():
    # two steps of: a (10 us), gap 1.5 us, b (30 us), gap 200 us (the step boundary), ...
    kernels = []
    t = 0.0
    for _ in range(2):
        kernels.append((t, t + 10.0, "a"))
        kernels.append((t + 11.5, t + 41.5, "b"))
        t += 241.5
    text = kernel_profile.report(kernels, 2, 250e-6, 16384, "title")
    lines = text.splitlines()
    assert lines[0].startswith("title: wall 0.250 ms/step (65,536,000 tokens/s)")
    assert "kernel time 0.040 ms/step, 2 launches/step" in lines[0]
    # gaps: 1.5 + 200 + 1.5 over 2 steps
    assert "gaps between kernels 0.102 ms/step" in lines[0]
    assert lines[1] == "gap time by gap size (us/step): 1-2us 2, >100us 100"
    pairs = lines[lines.index("kernel pairs with the most gap time (us/step, times/step):") + 1]
    assert pairs.split() == ["100.0", "0.5", "b", "->", "a"]
    table = lines[lines.index("kernels (us/step, launches/step):") + 1:]
    assert [row.split()[-1] for row in table] == ["b", "a"]
    assert table[0].split()[:2] == ["30.0", "1.0"]


@pytest.mark.parametrize("us, bucket", [(0.5, "<1us"), (1.0, "1-2us"), (3.9, "2-4us"),
                                        (9.0, "4-10us"), (50.0, "10-100us"), (100.0, ">100us")])
def test_gap_buckets(us, bucket):
    assert kernel_profile.gap_bucket(us) == bucket


def test_arguments():
    args = kernel_profile.parse_args(["--batch-size", "24", "--no-graphs"])
    assert args.batch_size == 24 and args.graphs is False and args.steps == 5
    with pytest.raises(SystemExit):
        kernel_profile.parse_args(["--steps", "0"])


def test_card_sampling_is_on_unless_asked_off():
    assert kernel_profile.parse_args([]).card is True
    assert kernel_profile.parse_args(["--no-card"]).card is False
