"""An imported Hugging Face GPT-2 on the GPU: GPUModel logits against transformers.

The random GPT2LMHeadModel of tests/test_formats_transformers.py (every parameter randomized,
the real vocabulary) is saved by `save_pretrained`, read with llmc.formats.load_model and run
through GPUModel (C=128, NH=2: head size 64, so bf16 runs the flash and the matmul attention);
transformers runs on the CPU in fp32 as the oracle.
- fp32: norm-wise relative error of the logits <= 1e-4 (the fp32 bound of test_gpu_model.py).
- bf16: the weights are rounded to bf16 for both sides (the file is saved in bf16), so only
  llmc's bf16 storage of activations differs: <= 2e-2 (the bf16 logits bound there).

Run (GPU machine): python -m pytest -m gpu tests/test_formats_gpu.py -q
"""
import numpy as np
import pytest

from llmc.formats import load_model
from tests.tolerances import rel_err

pytestmark = pytest.mark.gpu

B, T = 2, 128
TOL = {"fp32": 1e-4, "bf16": 2e-2}


@pytest.mark.parametrize("dtype,attention", [("fp32", "matmul"), ("bf16", "matmul"), ("bf16", "flash")])
def test_imported_logits_match_transformers_on_gpu(tmp_path, dtype, attention):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llmc.model.gpu_model import GPUModel
    from tests.test_formats_transformers import hf_logits, random_hf_model
    # C=128, NH=2: head size 64, so bf16 runs both attention kernels
    model = random_hf_model(seed=1, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16,
                            n_embd=128, n_head=2)
    model.save_pretrained(tmp_path / "hf")
    oracle = model.float().eval()
    mf = load_model(tmp_path / "hf")
    x = np.random.default_rng(7).integers(0, 50257, (B, T)).astype(np.int32)
    gm = GPUModel(mf.config, B, T, dtype=dtype, attention=attention)
    gm.load_params(mf.params)
    got = gm.logits(x)
    assert got.shape == (B, T, 50257) and np.all(np.isfinite(got))
    err = rel_err(got, hf_logits(oracle, x))
    print(f"{dtype} {gm.attention}: logits rel err {err:.2e}")
    assert err <= TOL[dtype], f"{dtype}: logits rel err {err:.2e} > {TOL[dtype]}"
