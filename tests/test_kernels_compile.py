"""Every kernel family compiles with NVRTC for sm_80 and sm_90a, both dtypes, with no warnings.

Runs on the CPU (no GPU or driver needed): it uses the NVRTC library from the cupy-cuda12x and
nvidia-cuda-nvrtc wheels, the same check as `python -m llmc.kernels --check`. Skips when NVRTC
cannot be loaded.

Run: pytest tests/test_kernels_compile.py
"""
import pytest

from llmc import kernels


def _nvrtc_available():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load NVRTC means: cannot check here
        return f"NVRTC not loadable ({type(e).__name__}: {e})"
    return None


_SKIP = _nvrtc_available()


@pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
def test_all_kernels_compile_cleanly():
    problems = kernels.check_all(verbose=False)
    assert not problems, "\n\n".join(problems)


@pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
@pytest.mark.parametrize("family", ["encoder", "layernorm", "matmul", "gelu", "adamw"])
def test_family_present(family):
    """The families of this part of llmc exist (check_all skips missing files silently)."""
    assert family in kernels.families()


def test_list_names_families_and_their_kernels(capsys):
    """`python -m llmc.kernels --list` prints one line per family: name, source, entry points."""
    from llmc import kernels
    assert kernels.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == kernels.families()
    for line in lines:
        fam = line.split()[0]
        assert f"kernels/{fam}.cu: " in line and kernels.entry_points(fam), line
    assert "gelu_forward, gelu_backward" in "\n".join(lines)
