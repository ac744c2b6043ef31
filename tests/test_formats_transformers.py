"""llmc.formats against `transformers` (the oracle; skipped when it is not installed).

- A random GPT2LMHeadModel (2 layers, C=64, the real vocabulary, every parameter randomized:
  biases nonzero, LayerNorm weights not one) saved by `save_pretrained` in fp32 and bf16:
  HF -> llmc -> HF reproduces every tensor bitwise, and the imported model's CPUModel logits
  match transformers' at fp32 (norm-wise relative error <= 1e-5).
- The reverse: an llmc model exported with save_model loads in `from_pretrained` with no
  missing or unexpected weights, in the dtype it was written in, and gives CPUModel's logits.

Run: python -m pytest tests/test_formats_transformers.py -q
"""
import numpy as np
import pytest

from llmc.config import ModelConfig
from llmc.model.cpu_model import CPUModel
from llmc.formats import load_model, save_model
from llmc.model.params import init_params, num_params, views
from tests.tolerances import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

L, NH, C, MAXT = 2, 2, 64, 128
MC = ModelConfig(n_layer=L, n_head=NH, n_embd=C, block_size=MAXT)
B, T = 2, 48


def random_hf_model(seed=0, dtype=None, n_embd=C, n_head=NH):
    """GPT2LMHeadModel with every parameter random (LayerNorm weights around 1, the rest noise)."""
    cfg = transformers.GPT2Config(n_layer=L, n_head=n_head, n_embd=n_embd, n_positions=MAXT,
                                  vocab_size=50257, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.to(dtype) if dtype is not None else model


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 50257, (B, T)).astype(np.int32)


def hf_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.float().numpy()


def cpu_logits(mf, x):
    m = CPUModel(mf.config, B, T)
    m.load_params(mf.params)
    return m.logits(x)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_save_pretrained_round_trip_is_bitwise(tmp_path, dtype):
    from safetensors.numpy import load_file
    model = random_hf_model(dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    m = load_model(tmp_path / "src")
    assert m.config == MC and m.format == "hf"
    save_model(m, tmp_path / "out", format="hf", dtype=dtype)
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    tied = [k for k in src if k.startswith("lm_head")]
    assert set(out) == set(src) - set(tied)
    for k, v in out.items():
        assert v.dtype == src[k].dtype and np.array_equal(v.view(np.uint8), src[k].view(np.uint8)), k


def test_imported_logits_match_transformers(tmp_path):
    model = random_hf_model()
    model.save_pretrained(tmp_path / "hf")
    mf = load_model(tmp_path / "hf")
    x = tokens()
    err = rel_err(cpu_logits(mf, x), hf_logits(model, x))
    assert err <= 1e-5, f"logits rel err {err:.2e}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exported_model_loads_in_transformers(tmp_path, dtype):
    rng = np.random.default_rng(3)
    flat = init_params(MC, 3) + 0.05 * rng.standard_normal(num_params(MC)).astype(np.float32)
    views(flat, MC)["wte"][MC.vocab_size:] = 0
    if dtype == "bf16":
        import ml_dtypes
        flat = flat.astype(ml_dtypes.bfloat16).astype(np.float32)  # exactly representable
    save_model((MC, flat), tmp_path / "hf", format="hf", dtype=dtype)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
    model = model.float().eval()
    x = tokens(1)
    err = rel_err(cpu_logits(load_model(tmp_path / "hf"), x), hf_logits(model, x))
    assert err <= 1e-5, f"logits rel err {err:.2e}"
