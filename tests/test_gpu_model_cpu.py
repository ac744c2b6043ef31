"""GPUModel/GPUAdamW wiring checked on the CPU, with a NumPy stand-in for CuPy (no GPU needed).

Two checks, each in a fresh subprocess (the stand-in replaces `cupy` in sys.modules there only):
- numerics: every op launcher is replaced by its llmc.model.reference math (with the op contract's
  `=`/`+=` semantics, fresh buffers poisoned with NaN, aliasing asserted absent where the
  contract forbids it); fp32 GPUModel + GPUAdamW must then equal CPUModel (float64) + AdamW:
  loss, every gradient tensor, the gradient norm, 4 optimizer steps with 2 micro-steps each,
  logits of full and shorter inputs, the on_layer_grads order; recompute and classifier_chunks.
- launch arguments: the REAL launchers (validation of shapes, dtypes, contiguity, 16-byte
  alignment, scratch sizes) with only the kernel launches and the cuBLAS / cuBLASLt calls
  stubbed, for bf16 flash/matmul, fp32, recompute, uneven classifier chunks, a ZeRO shard and
  the optimizer state.
- cublaslt: llmc.cuda.cublaslt and cublaslt_fp8 against a stand-in libcublasLt that records
  every descriptor attribute, layout and launch: transposes, epilogue, bias / aux pointers (set
  again when they move, no new plan), the fp8 layouts' data types, the scale pointers crossed
  over to cuBLASLt's A (our b) and B (our a), fast accumulation, and the argument checks.
This checks how GPUModel composes the ops, not the kernels (tests/test_gpu_*.py do, on a GPU).

Run: python -m pytest tests/test_gpu_model_cpu.py -q
"""
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _run(mode):
    proc = subprocess.run([sys.executable, __file__, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{mode} check failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip().endswith("OK"), proc.stdout


def test_wiring_matches_cpu_model():
    _run("numerics")


def test_real_launchers_accept_the_arguments():
    _run("launchers")


def test_cublaslt_plans_with_a_recording_library():
    _run("cublaslt")


# ---------------------------------------------------------------------------------------------
# the CuPy stand-in (installed only in the subprocess)

class _Dev:
    id = 0
    compute_capability = "80"  # the mma.sync flash path (the sm_90a one is checked on the GPU)

    def synchronize(self):
        pass


class _Ptr:
    def __init__(self, arr):
        self.arr, self.ptr = arr, arr.__array_interface__["data"][0]

    def __add__(self, offset):
        return self.ptr + offset

    def memset_async(self, value, size, stream=None):
        assert size == self.arr.nbytes
        self.arr.view(np.uint8).reshape(-1)[...] = value


class FakeArray(np.ndarray):
    def set(self, arr, stream=None):
        assert arr.dtype == self.dtype and arr.shape == self.shape, (arr.dtype, arr.shape, self.shape)
        self[...] = arr

    def get(self):
        return np.array(self)

    @property
    def data(self):
        return _Ptr(self)

    @property
    def device(self):
        return _Dev()


def _aligned(shape, dtype, fill):
    """512-byte aligned like CuPy's pool; fresh float buffers hold NaN (poison)."""
    shape = shape if isinstance(shape, tuple) else (shape,)
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + 512, np.uint8)
    off = (-raw.__array_interface__["data"][0]) % 512
    a = raw[off:off + n].view(dtype).reshape(shape)
    if fill is None:
        fill = np.nan if dtype.kind == "f" else 0x5A
    a[...] = fill
    return a.view(FakeArray)


def install_fake_cupy():
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeArray
    cp.empty = lambda shape, dtype=np.float32: _aligned(shape, dtype, None)
    cp.zeros = lambda shape, dtype=np.float32: _aligned(shape, dtype, 0)
    cp.ones = lambda shape, dtype=np.float32: _aligned(shape, dtype, 1)

    def asarray(x):
        x = np.asarray(x)
        a = _aligned(x.shape, x.dtype, 0)
        a[...] = x
        return a
    cp.asarray = asarray
    cp.asnumpy = lambda x: np.array(x)
    cp.mean = lambda a, out=None: np.mean(np.asarray(a, np.float32), out=out)
    cp.sqrt = np.sqrt
    cp.uint16, cp.uint32, cp.float32, cp.int32 = np.uint16, np.uint32, np.float32, np.int32

    class Stream:
        ptr = 0

        def synchronize(self):
            pass

        def is_capturing(self):
            return False
    cp.cuda = types.SimpleNamespace(get_current_stream=lambda: Stream(), Device=lambda: _Dev(),
                                    device=types.SimpleNamespace(get_cublas_handle=lambda: 0))
    sys.modules["cupy"] = cp
    return cp


# ---------------------------------------------------------------------------------------------
# mode "numerics": reference math behind every launcher

def install_reference_ops():
    from llmc.model import reference as ref
    from llmc.ops import adamw, attention, classifier, encoder, gelu, layernorm, matmul
    A = np.asarray

    def clean(*xs):
        for x in xs:
            assert not np.isnan(A(x, np.float64)).any(), "read a buffer nobody wrote"

    def encoder_forward(out, inp, wte, wpe):
        out[...] = ref.encoder_forward(A(wte), A(wpe), A(inp))

    def encoder_backward(dwte, dwpe, dout, inp, scratch):
        clean(dout)
        a, b = ref.encoder_backward(A(dout), A(inp), dwte.shape, dwpe.shape)
        dwte += a
        dwpe += b

    def layernorm_forward(out, mean, rstd, inp, weight, bias):
        clean(inp)
        o, m, r = ref.layernorm_forward(A(inp), A(weight), A(bias))
        out[...], mean[...], rstd[...] = o, m, r

    def fused_residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias):
        assert inp1.shape == inp2.shape == residual.shape == out.shape
        residual[...] = A(inp1) + A(inp2)
        layernorm_forward(out, mean, rstd, residual, weight, bias)

    def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, *,
                           dinp_colsum=None):
        clean(dout, dinp)
        dx, dw, db = ref.layernorm_backward(A(dout), A(inp), A(weight), A(mean), A(rstd))
        dinp += dx
        dweight += dw
        dbias += db
        if dinp_colsum is not None:
            dinp_colsum += A(dinp).reshape(-1, dinp.shape[-1]).sum(0)

    def matmul_forward(out, inp, weight, bias=None):
        x = A(inp).reshape(-1, weight.shape[1])
        clean(x)
        out[...] = ref.matmul_forward(x, A(weight), None if bias is None else A(bias)).reshape(out.shape)

    def matmul_backward(dinp, dweight, dbias, dout, inp, weight, scratch, *, pre_gelu=None):
        OC, C = weight.shape
        g = A(dout).reshape(-1, OC)
        clean(g)
        assert not np.shares_memory(dinp, dout) and not np.shares_memory(dinp, inp)
        dx, dw, db = ref.matmul_backward(g, A(inp).reshape(-1, C), A(weight), dbias is not None)
        if pre_gelu is not None:
            assert pre_gelu.shape == dinp.shape and not np.shares_memory(pre_gelu, dinp)
            clean(pre_gelu)
            dx = ref.gelu_backward(A(pre_gelu).reshape(dx.shape), dx)
        dinp[...] = dx.reshape(dinp.shape)
        dweight += dw
        if dbias is not None:
            dbias += db

    def attention_forward(out, saved, qkv, n_head, scratch):
        o, att = ref.attention_forward(A(qkv), n_head)
        out[...] = o
        saved["att"][...] = att

    def attention_backward(dqkv, dout, qkv, out, saved, n_head, scratch):
        assert not np.shares_memory(dqkv, dout)
        dqkv[...] = ref.attention_backward(A(dout), A(qkv), A(saved["att"]), n_head)

    def gelu_forward(out, inp):
        out[...] = ref.gelu_forward(A(inp))

    def gelu_backward(dinp, inp, dout):
        dinp[...] = ref.gelu_backward(A(inp), A(dout))

    def fused_classifier(logits, losses, targets, V, dloss, write_dlogits=True):
        clean(logits)
        l, p = ref.crossentropy_forward(A(logits), A(targets), V)
        losses[...] = l
        if write_dlogits:
            logits[...] = ref.crossentropy_backward(p, A(targets), np.full(len(l), dloss, np.float32))

    def mean_loss(mean, losses):
        mean[...] = np.mean(A(losses, np.float64))

    def global_norm_squared(out, grads, scratch):
        out[0] = np.sum(A(grads, np.float64) ** 2)

    def adamw_update(params, master, grads, m, v, norm_sq, *, lr, beta1, beta2, eps,
                     weight_decay, step, grad_clip, seed, ranges, offset=0):
        n = params.size
        clip = min(1.0, grad_clip / (math.sqrt(norm_sq[0]) + 1e-6)) if grad_clip > 0 else 1.0
        g = A(grads, np.float32) * np.float32(clip)
        gi = offset + np.arange(n)
        decay = np.zeros(n, bool)
        for a, b in A(ranges):
            decay |= (gi >= a) & (gi < b)
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * g * g
        p = np.array(master if master is not None else params, np.float32)
        p -= lr * ((m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
                   + np.where(decay, weight_decay, 0.0) * p)
        if master is not None:
            master[...] = p
        params[...] = p.astype(params.dtype)

    for mod, fns in ((encoder, (encoder_forward, encoder_backward)),
                     (layernorm, (layernorm_forward, fused_residual_layernorm_forward,
                                  layernorm_backward)),
                     (matmul, (matmul_forward, matmul_backward)),
                     (attention, (attention_forward, attention_backward)),
                     (gelu, (gelu_forward, gelu_backward)),
                     (classifier, (fused_classifier, mean_loss)),
                     (adamw, (global_norm_squared, adamw_update))):
        for fn in fns:
            setattr(mod, fn.__name__, fn)
    attention.flash_available = lambda: False


def check_numerics():
    install_fake_cupy()
    install_reference_ops()
    from llmc.config import ModelConfig
    from llmc.model.cpu_model import CPUModel
    from llmc.model.gpu_model import GPUModel
    from llmc.training.gpu_optim import GPUAdamW
    from llmc.training.optim import AdamW
    from llmc.model.params import init_params, views
    from tests.tolerances import rel_err
    mc = ModelConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=61, padded_vocab_size=64,
                     block_size=16)
    B, T = 2, 8
    rng = np.random.default_rng(0)
    flat = init_params(mc, 0)
    flat += 0.05 * rng.standard_normal(flat.size).astype(np.float32)
    views(flat, mc)["wte"][mc.vocab_size:] = 0
    for recompute, chunks in ((0, 1), (1, 3), (0, B * T)):
        g, c = GPUModel(mc, B, T, dtype="fp32", recompute=recompute, classifier_chunks=chunks), \
            CPUModel(mc, B, T, dtype=np.float64)
        g.load_params(flat)
        c.load_params(flat.astype(np.float64))
        assert np.array_equal(g.params_fp32(), flat)
        og = GPUAdamW(g, weight_decay=0.1, grad_clip=0.5, seed=1)
        oc = AdamW(c.params, mc, weight_decay=0.1, grad_clip=0.5)
        for step in range(4):
            x, y = (rng.integers(0, mc.vocab_size, (B, T)).astype(np.int32) for _ in range(2))
            g.zero_grad()
            c.zero_grad()
            seen = []
            lg = float(g.forward_backward(x, y, 0.5, on_layer_grads=seen.append))
            assert float(g.forward_backward(x, y, 0.5)) == lg
            lc = c.forward_backward(x, y, 0.5)
            c.forward_backward(x, y, 0.5)
            assert seen == [2, 1, 0, -1], seen
            assert abs(lg - lc) <= 1e-5 * lc, (lg, lc)
            for name, v in views(np.asarray(g.grads), mc).items():
                err = rel_err(v, views(c.grads, mc)[name])
                assert err <= 1e-4, f"recompute {recompute} chunks {chunks} step {step}: {name} {err:.2e}"
            ng, nc = float(og.step(1e-2, step)), oc.step(c.grads, 1e-2, step)
            assert abs(ng - nc) <= 1e-5 * nc, (ng, nc)
        for xs in (x, x[:1, :5], x[:, :3]):
            assert rel_err(g.logits(xs), c.logits(xs)) <= 1e-5
        assert abs(float(g.forward(x, y)) - c.forward(x, y)) <= 1e-5 * lc
        assert g.forward(x) is None
        state = og.state_dict()
        og.load_state_dict(state)
        print(f"recompute {recompute} chunks {chunks}: loss {lg:.6f} vs {lc:.6f}")
    print("OK")


# ---------------------------------------------------------------------------------------------
# mode "launchers": the real launchers with launches stubbed

def check_launchers():
    cp = install_fake_cupy()
    from llmc import kernels
    from llmc.cuda import cublas
    from llmc.cuda import cublaslt
    launched = []

    class Kernel:
        max_dynamic_shared_size_bytes = 48 * 1024

        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args, shared_mem=0):
            launched.append(self.name)

    class Lib:
        def setStream(self, *a):
            pass

        def getMathMode(self, handle):
            return 0

        def setMathMode(self, *a):
            pass

        def gemmEx(self, *a):
            launched.append("gemmEx")

        def gemmStridedBatchedEx(self, *a):
            launched.append("gemmStridedBatchedEx")
    kernels.function = lambda family, name, dtype="bf16": Kernel(f"{family}.{name}.{dtype}")
    cublas._lib = lambda: Lib()
    cublaslt._run = lambda key, *a: launched.append(f"cublasLtMatmul.{key[10]}")  # epilogue
    import llmc.ops.attention as attention
    attention.flash_available = lambda: True
    import llmc.ops.flash_attention as flash
    flash._kernel = lambda family, kind, warps: Kernel(f"flash.{kind}")
    from llmc.config import ModelConfig
    from llmc.model.gpu_model import GPUModel
    from llmc.training.gpu_optim import GPUAdamW
    from llmc.model.params import init_params
    small = ModelConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=1000,
                        padded_vocab_size=1024, block_size=128)
    cases = [(small, 4, 64, "bf16", "flash", 0, 1), (small, 4, 64, "bf16", "matmul", 1, 3),
             (small, 4, 64, "fp32", "auto", 1, 1), (small, 3, 17, "bf16", "auto", 0, 5),
             (ModelConfig(n_layer=2, n_head=12, n_embd=768), 1, 32, "bf16", "auto", 1, 2)]
    for mc, B, T, dtype, method, recompute, chunks in cases:
        launched.clear()
        m = GPUModel(mc, B, T, dtype=dtype, attention=method, recompute=recompute,
                     classifier_chunks=chunks)
        m.load_params(init_params(mc, 0))
        n = m.params.size
        opt, shard = GPUAdamW(m, weight_decay=0.1), GPUAdamW(m, shard=((n // 3) // 8 * 8, n))
        x = np.random.default_rng(0).integers(0, mc.vocab_size, (B, T)).astype(np.int32)
        m.zero_grad()
        m.forward_backward(x, x, 0.5, on_layer_grads=lambda l: None)
        m.forward_backward(cp.asarray(x), cp.asarray(x), 0.5)
        m.forward(x, x)
        m.logits(x[:1, :5])
        opt.step(1e-3, 0)
        shard.step(1e-3, 0, norm_reduce=lambda buf: None)
        shard.load_state_dict(shard.state_dict())
        assert launched, "nothing launched"
        print(f"{dtype} {m.attention} recompute {recompute} chunks {chunks}: {len(launched)} launches")
    print("OK")


# ---------------------------------------------------------------------------------------------
# mode "cublaslt": the plan bookkeeping against a recording stand-in library

class RecordingLt:
    """libcublasLt's calls that llmc.cuda.cublaslt makes; descriptors and layouts are ids."""

    def __init__(self):
        self.next_id, self.attrs, self.layouts, self.launches = 1, {}, {}, []

    def _new(self, ref):
        ref._obj.value = self.next_id
        self.next_id += 1
        return ref._obj.value

    def cublasLtCreate(self, ref):
        self._new(ref)
        return 0

    def cublasLtMatmulDescCreate(self, ref, compute, scale):
        self.attrs[self._new(ref)] = {}
        return 0

    def cublasLtMatmulDescSetAttribute(self, desc, attr, ref, size):
        self.attrs[desc.value if hasattr(desc, "value") else desc][attr] = ref._obj.value
        return 0

    def cublasLtMatrixLayoutCreate(self, ref, dtype, rows, cols, ld):
        self.layouts[self._new(ref)] = (dtype, rows, cols, ld)
        return 0

    def cublasLtMatmulPreferenceCreate(self, ref):
        self._new(ref)
        return 0

    def cublasLtMatmulPreferenceSetAttribute(self, *a):
        return 0

    def cublasLtMatmulPreferenceDestroy(self, *a):
        return 0

    def cublasLtMatmulAlgoGetHeuristic(self, handle, desc, la, lb, lc, ld, pref, n, results,
                                       count):
        for i in range(2):
            results[i].state, results[i].workspaceSize = 0, 0
            results[i].algo.data[0] = 100 + i
        count._obj.value = 2
        return 0

    def cublasLtMatmul(self, handle, desc, alpha, b, la, a, lb, beta, c, lc, d, ld, algo, ws,
                       ws_bytes, stream):
        self.launches.append((desc.value if hasattr(desc, "value") else desc, a, b, c))
        return 0


def check_cublaslt():
    import os
    import pytest
    os.environ["LLMC_MATMUL_TUNE"] = "0"  # no timing: the stand-in has no events
    cp = install_fake_cupy()
    from llmc.cuda import cublaslt as lt
    from llmc.cuda import cublaslt_fp8
    from llmc.ops import BF16
    rec = RecordingLt()
    lt._lib = lambda: rec
    dev = lt._device(0)

    def arr(*shape, dtype=BF16):
        return cp.zeros(shape, dtype)

    def plan_desc():
        return list(dev.plans.values())[-1].desc.value

    # bf16 forward with bias: x (64, 32) @ w (48, 32).T
    x, w, out, bias = arr(64, 32), arr(48, 32), arr(64, 48), arr(48)
    lt.matmul(out, x, w, trans_b=True, epilogue="bias", bias=bias)
    d = plan_desc()
    assert rec.attrs[d][lt.DESC_TRANSA] == 1 and rec.attrs[d][lt.DESC_TRANSB] == 0
    assert rec.attrs[d][lt.DESC_EPILOGUE] == lt.EPILOGUES["bias"]
    assert rec.attrs[d][lt.DESC_BIAS_POINTER] == bias.data.ptr
    assert rec.launches[-1] == (d, x.data.ptr, w.data.ptr, out.data.ptr)
    bias2, n_plans = arr(48), len(dev.plans)
    lt.matmul(out, x, w, trans_b=True, epilogue="bias", bias=bias2)
    assert len(dev.plans) == n_plans, "a moved bias made a new plan"
    assert rec.attrs[d][lt.DESC_BIAS_POINTER] == bias2.data.ptr
    # GELU with aux written: aux pointer and row stride on the descriptor
    pre = arr(64, 48)
    lt.matmul(out, x, w, trans_b=True, epilogue="gelu_aux_bias", bias=bias, aux=pre)
    d = plan_desc()
    assert rec.attrs[d][lt.DESC_EPILOGUE_AUX_POINTER] == pre.data.ptr
    assert rec.attrs[d][lt.DESC_EPILOGUE_AUX_LD] == 48
    with pytest.raises(ValueError, match="^aux:"):
        lt.matmul(out, x, w, trans_b=True, epilogue="bias", bias=bias, aux=pre)
    with pytest.raises(ValueError, match="^beta:"):
        lt.matmul(out, x, w, trans_b=True, epilogue="dgelu", aux=pre, beta=1.0)

    # fp8: a (64, 32) e5m2 @ b (48, 32).T e4m3, scales crossed over to cuBLASLt's operands
    a8, b8 = arr(64, 32, dtype=np.uint8), arr(48, 32, dtype=np.uint8)
    sa, sb = cp.ones(4, np.float32)[:1], cp.ones(4, np.float32)[:1]
    cublaslt_fp8.matmul_fp8(out, a8, "e5m2", sa, b8, "e4m3", sb, epilogue="bias", bias=bias,
                            fast_accum=True)
    d = plan_desc()
    plan = list(dev.plans.values())[-1]
    assert rec.layouts[plan.layout_a.value][0] == cublaslt_fp8.FP8_TYPES["e4m3"]  # our b
    assert rec.layouts[plan.layout_b.value][0] == cublaslt_fp8.FP8_TYPES["e5m2"]  # our a
    assert rec.attrs[d][lt.DESC_A_SCALE_POINTER] == sb.data.ptr
    assert rec.attrs[d][lt.DESC_B_SCALE_POINTER] == sa.data.ptr
    assert rec.attrs[d][lt.DESC_FAST_ACCUM] == 1
    assert rec.attrs[d][lt.DESC_BIAS_POINTER] == bias.data.ptr
    assert rec.launches[-1] == (d, a8.data.ptr, b8.data.ptr, out.data.ptr)
    sa2 = cp.ones(4, np.float32)[:1]
    cublaslt_fp8.matmul_fp8(out, a8, "e5m2", sa2, b8, "e4m3", sb, epilogue="bias", bias=bias,
                            fast_accum=True)
    assert rec.attrs[d][lt.DESC_B_SCALE_POINTER] == sa2.data.ptr
    with pytest.raises(ValueError, match="16-byte aligned scale pointer"):
        cublaslt_fp8.matmul_fp8(out, a8, "e5m2", cp.ones(4, np.float32)[1:2], b8, "e4m3", sb)
    with pytest.raises(ValueError, match="^bias:"):
        cublaslt_fp8.matmul_fp8(out, a8, "e5m2", sa, b8, "e4m3", sb, epilogue="bias",
                                bias=cp.ones(48, np.float32))
    print("OK")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    {"numerics": check_numerics, "launchers": check_launchers,
     "cublaslt": check_cublaslt}[sys.argv[1]]()
