"""llmc.formats and `python -m llmc.export` without transformers: files written here by an
independent writer (safetensors / raw bytes with the published layouts) are read, written back
and compared bitwise; every kind of bad input gives one FormatError line naming the file; an
export that fails leaves nothing behind and keeps the previous export.

- Hugging Face: both on-disk layouts (save_pretrained's `transformer.` prefix; the older hub
  layout with attn.bias / masked_bias buffers), fp32 and bf16: HF -> llmc -> HF is bitwise.
- llm.c .bin, versions 3 (fp32) and 5 (bf16): bin -> llmc -> bin is byte-identical.
- llmc checkpoints and training out dirs (newest complete checkpoint); hub ids (offline errors
  with monkeypatch, nothing is downloaded).

Run: python -m pytest tests/test_formats.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llmc.training import checkpoint
from llmc.config import ModelConfig
from llmc.export import main as export_main
from llmc.formats import FormatError, ModelFile, hf, load_model, save_model
from llmc.model.params import init_params, num_params, views

ROOT = Path(__file__).resolve().parents[1]
L, NH, C, MAXT = 2, 2, 16, 16
MC = ModelConfig(n_layer=L, n_head=NH, n_embd=C, block_size=MAXT)  # V 50257, Vp 50304
BF16 = np.dtype(ml_dtypes.bfloat16)

# HF name inside block h.N -> shape (Conv1D weights are (in, out))
HF_LAYER = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C),
            "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
            "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}


def hf_config(**changes):
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": L,
           "n_head": NH, "n_embd": C, "n_positions": MAXT, "vocab_size": 50257,
           "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    cfg.update(changes)
    return cfg


def hf_tensors(dtype=np.float32, seed=0):
    """Random tensors named as GPT2LMHeadModel.save_pretrained names them (no lm_head)."""
    rng = np.random.default_rng(seed)
    shapes = {"wte.weight": (50257, C), "wpe.weight": (MAXT, C), "ln_f.weight": (C,),
              "ln_f.bias": (C,)}
    shapes.update({f"h.{l}.{k}": s for l in range(L) for k, s in HF_LAYER.items()})
    return {f"transformer.{k}": rng.standard_normal(s).astype(np.float32).astype(dtype)
            for k, s in shapes.items()}


def write_hf(directory, tensors, config=None, layout="save_pretrained"):
    """A HF directory. layout "hub": no prefix, plus the attention mask buffers (older files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "hub":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        for l in range(L):
            tensors[f"h.{l}.attn.bias"] = np.tril(np.ones((MAXT, MAXT), np.float32))[None, None]
            tensors[f"h.{l}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config or hf_config()))
    return directory


def write_bin(path, params, version=3, header_changes=None):
    """An llm.c model file written from its published layout."""
    header = np.zeros(256, np.int32)
    header[:8] = [20240326, version, MAXT, 50257, L, NH, C, 50304]
    for i, v in (header_changes or {}).items():
        header[i] = v
    dtype = np.float32 if version == 3 else BF16
    Path(path).write_bytes(header.tobytes() + params.astype(dtype).tobytes())
    return Path(path)


def random_params(seed=0):
    """init_params plus noise everywhere except the padded rows of wte (exports drop them)."""
    rng = np.random.default_rng(seed)
    flat = init_params(MC, seed) + 0.05 * rng.standard_normal(num_params(MC)).astype(np.float32)
    views(flat, MC)["wte"][MC.vocab_size:] = 0
    return flat


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_round_trip_is_bitwise(tmp_path, layout, dtype):
    src = hf_tensors(np.float32 if dtype == "fp32" else BF16)
    extra = {}
    if layout == "hub":  # a tied head stored anyway: accepted, not written back
        extra["lm_head.weight"] = src["transformer.wte.weight"]
    write_hf(tmp_path / "src", {**src, **extra}, layout=layout)
    m = load_model(tmp_path / "src")
    assert m.format == "hf" and m.config == MC and m.params.dtype == np.float32
    p = views(m.params, MC)
    assert not p["wte"][MC.vocab_size:].any(), "padded vocabulary rows must be zero"
    assert np.array_equal(p["qkvw"][1], src["transformer.h.1.attn.c_attn.weight"].astype(np.float32).T)
    out = save_model(m, tmp_path / "out", format="hf", dtype=dtype)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k].view(np.uint8), v.view(np.uint8)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == cfg["n_ctx"] == MAXT
    assert cfg["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["tie_word_embeddings"] is True
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], "temporary files left"


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_bin_round_trip_is_byte_identical(tmp_path, version):
    params = init_params(MC, 0) + 0.05 * np.random.default_rng(1).standard_normal(
        num_params(MC)).astype(np.float32)  # padded rows nonzero too: llm.c keeps them
    src = write_bin(tmp_path / "src.bin", params, version)
    m = load_model(src)
    assert m.format == "llmc-bin" and m.config == MC and m.path == src
    if version == 3:
        assert np.array_equal(m.params, params)
    out = save_model(m, tmp_path / "out.bin", format="llmc-bin",
                     dtype="fp32" if version == 3 else "bf16")
    assert out.read_bytes() == src.read_bytes()


def test_hf_and_bin_hold_the_same_model(tmp_path):
    flat = random_params()
    save_model((MC, flat), tmp_path / "hf", format="hf")
    save_model(ModelFile(MC, flat, "llmc-bin", tmp_path), tmp_path / "m.bin", format="llmc-bin")
    a, b = load_model(tmp_path / "hf" / "model.safetensors"), load_model(tmp_path / "m.bin")
    assert np.array_equal(a.params, flat) and np.array_equal(b.params, flat)
    bf = load_model(save_model((MC, flat), tmp_path / "bf", format="hf", dtype="bf16"))
    assert np.array_equal(bf.params, flat.astype(BF16).astype(np.float32))


def test_checkpoint_and_out_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"device": "cpu", "model": "d4"}))  # the run's
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FormatError) as e:
        load_model(tmp_path)
    assert "no complete checkpoint" in one_line(e)
    state = {"model": [L, NH, C, 50304, MAXT]}
    for step, seed in ((5, 1), (10, 2)):
        checkpoint.save(tmp_path, step, params=random_params(seed), optim={}, state=state, keep=5)
    (tmp_path / "ckpt_00000015.tmp").mkdir()  # a crashed save: ignored
    m = load_model(tmp_path)
    assert m.format == "llmc-ckpt" and m.path.name == "ckpt_00000010" and m.config == MC
    assert np.array_equal(m.params, random_params(2))
    assert "ckpt_00000010" in capsys.readouterr().err
    m5 = load_model(tmp_path / "ckpt_00000005" / "state.json")
    assert np.array_equal(m5.params, random_params(1))


def test_hub_id_is_fetched_with_snapshot_download(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    local = write_hf(tmp_path / "snap", hf_tensors())
    calls = []

    def fake(repo_id, allow_patterns):
        calls.append((repo_id, sorted(allow_patterns)))
        return str(local)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    m = load_model("someone/tiny-gpt2")
    assert m.format == "hf" and m.path == local
    assert calls == [("someone/tiny-gpt2", ["config.json", "model.safetensors"])]


def test_hub_offline_or_missing_names_the_fix(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(**kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FormatError) as e:
        load_model("openai-community/gpt2")
    assert "openai-community/gpt2" in one_line(e) and "pass its path" in str(e.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FormatError) as e:
        load_model("openai-community/gpt2")
    assert "llmc[data]" in one_line(e) and "pass its path" in str(e.value)


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the file, the problem and the fix

def _hf_case(tmp_path, case):
    t = hf_tensors()
    cfg = hf_config()
    if case == "not_gpt2":
        cfg["model_type"] = "llama"
    elif case == "vocab":
        cfg["vocab_size"] = 50304
    elif case == "activation":
        cfg["activation_function"] = "gelu"
    elif case == "eps":
        cfg["layer_norm_epsilon"] = 1e-6
    elif case == "untied":
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1
    elif case == "missing_tensor":
        del t["transformer.h.1.mlp.c_fc.bias"]
    elif case == "wrong_shape":
        t["transformer.wpe.weight"] = t["transformer.wpe.weight"][:8]
    d = write_hf(tmp_path / "m", t, cfg)
    f = d / "model.safetensors"
    if case == "missing_file":
        f.unlink()
    elif case == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif case == "corrupt":
        f.write_bytes(b"\xff" * 64)
    return d


HF_CASES = {"not_gpt2": "'llama'", "vocab": "50304", "activation": "'gelu'", "eps": "1e-06",
            "untied": "lm_head", "missing_tensor": "h.1.mlp.c_fc.bias", "wrong_shape": "wpe",
            "missing_file": "missing", "truncated": "truncated or corrupt",
            "corrupt": "truncated or corrupt"}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_bad_hf_input(tmp_path, case):
    d = _hf_case(tmp_path, case)
    with pytest.raises(FormatError) as e:
        load_model(d)
    msg = one_line(e)
    assert str(d) in msg and HF_CASES[case] in msg, msg


BIN_CASES = {"magic": ({0: 1234}, "magic number 1234"), "version": ({1: 4}, "version 4"),
             "sizes": ({5: 3}, "inconsistent"), "truncated": ({}, "truncated")}


@pytest.mark.parametrize("case", sorted(BIN_CASES))
def test_bad_llmc_bin(tmp_path, case):
    changes, expect = BIN_CASES[case]
    path = write_bin(tmp_path / "m.bin", random_params(), header_changes=changes)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError) as e:
        load_model(path)
    msg = one_line(e)
    assert str(path) in msg and expect in msg, msg


def test_unknown_paths(tmp_path):
    with pytest.raises(FormatError) as e:
        load_model(tmp_path / "nothing" / "here.bin")
    assert "no such file" in one_line(e)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError) as e:
        load_model(tmp_path / "notes.txt")
    assert "notes.txt" in one_line(e)
    with pytest.raises(FormatError) as e:
        load_model(tmp_path)
    assert "no model here" in one_line(e)


# ----------------------------------------------------------------------------------------------
# export: the CLI, and atomic replacement

def test_export_cli(tmp_path, capsys):
    src = write_hf(tmp_path / "src", hf_tensors())
    assert export_main([str(src), "--format", "llmc-bin", "--dtype", "bf16", "--out",
                        str(tmp_path / "e" / "m.bin")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert export_main([str(tmp_path / "e" / "m.bin"), "--format", "hf", "--out",
                        str(tmp_path / "hf2")]) == 0
    want = load_model(src).params.astype(BF16).astype(np.float32)
    assert np.array_equal(load_model(tmp_path / "hf2").params, want)


@pytest.mark.parametrize("fmt", ["hf", "llmc-bin"])
def test_failed_export_leaves_nothing_and_keeps_the_old_one(tmp_path, monkeypatch, capsys, fmt):
    src = write_bin(tmp_path / "src.bin", random_params())
    out = tmp_path / ("hf" if fmt == "hf" else "out.bin")
    assert export_main([str(src), "--format", fmt, "--out", str(out)]) == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    module = hf if fmt == "hf" else __import__("llmc.formats.llmc_bin", fromlist=["write"])
    real = module.write

    def half_then_fail(path, *args, **kw):
        real(path, *args, **kw)  # everything is written ...
        target = Path(path) / "model.safetensors" if fmt == "hf" else Path(path)
        target.write_bytes(target.read_bytes()[:100])  # ... then half-way lost
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(module, "write", half_then_fail)
    assert export_main([str(src), "--format", fmt, "--dtype", "bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left" in err[0]
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a failed export changed or left files"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.bin", out.name])


def test_export_refuses_to_replace_other_directories(tmp_path, capsys):
    src = write_bin(tmp_path / "src.bin", random_params())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("mine")
    assert export_main([str(src), "--format", "hf", "--out", str(tmp_path / "docs")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert (tmp_path / "docs" / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert export_main([str(src), "--format", "llmc-bin", "--out", str(blocker / "m.bin")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["truncated", "not_gpt2"])
def test_export_cli_bad_input_exit_2(tmp_path, case):
    d = _hf_case(tmp_path, case)
    r = subprocess.run([sys.executable, "-m", "llmc.export", str(d), "--format", "llmc-bin",
                        "--out", str(tmp_path / "x.bin")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(d) in err[0], r.stderr
    assert not (tmp_path / "x.bin").exists()
