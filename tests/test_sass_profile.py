"""bench/sass_profile.py's parsing and report, from a made-up Nsight Compute source export (no
GPU): the opcode of a SASS line, the export's kernels and rows, the totals by opcode, the code
grouped by execution count, the stall table, and the command line's checks.

Run:  pytest tests/test_sass_profile.py
"""
import pytest

from bench import sass_profile

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)",'
          '"Warp Stall Sampling (Not-issued Samples)","# Samples","Instructions Executed"')


def _row(addr, sass, stalls, executed):
    return f'"{addr}","      {sass}","{stalls}","0","{stalls}","{executed}"'


EXPORT = "\n".join([
    "==PROF== Connected to process 1 (/usr/bin/python3)",
    '"Kernel Name","kernel_a",',
    HEADER,
    _row("0x10", "LDC R1, c[0x0][0x28]", 5, 100),           # prologue: once per warp
    _row("0x20", "@!P0 FFMA.FTZ R1, R2, R3, R4", 30, 800),   # loop body: 8 tiles per warp
    _row("0x30", "MUFU.EX2 R5, R1", 50, 800),
    _row("0x40", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], RZ", 10, 800),
    _row("0x50", "@UP0 UIADD3 UR4, UR5, 0x1, URZ", 0, 800),
    _row("0x60", "EXIT", 5, 100),
    _row("0x70", "BRA 0x70", 0, 0),
    '"Kernel Name","kernel_b",',
    HEADER,
    _row("0x10", "FADD R1, R2, R3", 1, 64),
    "==PROF== Disconnected from process 1",
])


@pytest.mark.parametrize("sass, op", [("@!P0 FFMA.FTZ R1, R2, R3, R4", "FFMA"),
                                      ("@!PT  LDS RZ, [RZ]", "LDS"),
                                      ("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], RZ", "HGMMA"),
                                      ("@UP0 UIADD3 UR4, UR5, 0x1, URZ", "UIADD3"),
                                      ("EXIT", "EXIT"), ("", "?")])
def test_opcode(sass, op):
    assert sass_profile.opcode(sass) == op


def test_parse_finds_every_kernel_and_row():
    kernels = sass_profile.parse_source_csv(EXPORT)
    assert list(kernels) == ["kernel_a", "kernel_b"]
    assert len(kernels["kernel_a"]) == 7
    assert kernels["kernel_a"][1] == ("0x20", "@!P0 FFMA.FTZ R1, R2, R3, R4", 800, 30)
    assert kernels["kernel_b"] == [("0x10", "FADD R1, R2, R3", 64, 1)]


def test_parse_refuses_an_export_without_a_source_table():
    with pytest.raises(ValueError, match="SourceCounters"):
        sass_profile.parse_source_csv('"Kernel Name","k",\n"ID","Metric"\n"1","2"\n')


def test_report():
    rows = sass_profile.parse_source_csv(EXPORT)["kernel_a"]
    lines = sass_profile.report("kernel_a", rows, top=2).splitlines()
    # 100 + 4 x 800 + 100 = 3,400 warp instructions, 7 in the code, 100 stall samples
    assert lines[0] == "kernel_a: 3,400 warp instructions executed, 7 in the code, 100 stall samples"
    ops = lines[2:lines.index("code by execution count (each instruction of a group runs that "
                              "many times):")]
    assert [o.split()[0] for o in ops[:4]] == ["FFMA", "MUFU", "HGMMA", "UIADD3"]
    assert ops[0].split()[1:] == ["800", "23.5%"]
    start = lines.index("code by execution count (each instruction of a group runs that many "
                        "times):")
    groups = lines[start + 1:start + 3]
    assert groups[0].split()[:4] == ["x800", "4", "instructions", "94.1%"]
    assert groups[1].split()[:4] == ["x100", "2", "instructions", "5.9%"]
    stall = lines[lines.index("most stall samples (2):") + 1:]
    assert [s.split()[0] for s in stall] == ["50.0%", "30.0%"]
    assert stall[0].endswith("MUFU.EX2 R5, R1")


def test_main_reads_a_saved_export(tmp_path, capsys):
    path = tmp_path / "export.csv"
    path.write_text(EXPORT)
    assert sass_profile.main(["--csv", str(path), "--kernel-name", "kernel_b", "--top", "0"]) == 0
    assert capsys.readouterr().out.startswith("kernel_b: 64 warp instructions executed")
    assert sass_profile.main(["--csv", str(path), "--kernel-name", "nope"]) == 2
    assert "kernel_a" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--workload", "nope"], ["--workload", "flash-forward",
                                  "--csv", "x.csv"], ["--workload", "gelu-forward",
                                  "--batch-size", "0"], ["--csv", "x.csv", "--top", "-1"]])
def test_arguments_are_checked(argv):
    with pytest.raises(SystemExit):
        sass_profile.parse_args(argv)
