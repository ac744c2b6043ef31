"""Helper module for tests/test_multigpu.py (not a test): one rank on a GPU, run by llmc.launch.

    python -m llmc.launch --nproc-per-node 2 --module multigpu_probe -- OUT_DIR MODE

MODE collectives: every llmc.dist.distributed.Dist collective in fp32 and bf16 against host sums.
MODE dataparallel: llmc.dist.zero.DataParallel (zero 0 and 1, fp32 and bf16) for 3 steps of a small
  GPT-2 with each rank's half of a batch, against one GPUModel + GPUAdamW on the whole batch.
MODE hang: rank 1 never reaches the first collective after the set-up; rank 0 must be ended by
  its watchdog (LLMC_DIST_TIMEOUT) with a message naming rank 1.
Writes OUT_DIR/rank<R>.json; an AssertionError ends the rank non-zero (the launcher reports it).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np


def _dev(host, dtype):
    """Host float array -> device array of `dtype` ("fp32"/"bf16") through raw bits."""
    import cupy
    from llmc.model.gpu_model import from_host
    from llmc.ops import BF16, F32
    dt = BF16 if dtype == "bf16" else F32
    out = cupy.empty(host.shape, dtype=dt)
    from_host(out, np.asarray(host, dtype=np.float32).astype(dt))
    return out


def _host(arr):
    from llmc.model.gpu_model import to_host
    return to_host(arr).astype(np.float64)


def collectives(dist, out):
    import cupy
    W, r = dist.world_size, dist.rank
    checks = []

    def check(name, got, want):
        ok = np.array_equal(got, want)
        checks.append((name, bool(ok)))
        assert ok, f"{name}: got {got[:5]}... want {want[:5]}..."

    n = 1_000_003  # odd: nothing is a multiple of anything
    idx = np.arange(n) % 7
    mine = lambda rank: idx + rank + 1.0  # noqa: E731 - small integers: exact in bf16 sums
    total = sum(mine(q) for q in range(W))
    for dtype in ("fp32", "bf16"):
        buf = _dev(mine(r), dtype)
        dist.all_reduce(buf, op="sum")
        check(f"all_reduce sum {dtype}", _host(buf), total)
        buf = _dev(mine(r), dtype)
        dist.all_reduce(buf, op="avg")
        check(f"all_reduce avg {dtype}", _host(buf), total / W)
        buf = _dev(mine(r), dtype)
        dist.reduce(buf, root=W - 1, op="sum")
        check(f"reduce to {W - 1} {dtype}", _host(buf), total if r == W - 1 else mine(r))
        buf = _dev(mine(r), dtype)
        dist.broadcast(buf, root=W - 1)
        check(f"broadcast from {W - 1} {dtype}", _host(buf), mine(W - 1))
        k = 4099
        send = _dev(np.concatenate([mine(r)[:k] * (q + 1) for q in range(W)]), dtype)
        recv = _dev(np.zeros(k), dtype)
        dist.reduce_scatter(send, recv, op="sum")
        check(f"reduce_scatter {dtype}", _host(recv), sum(mine(q)[:k] for q in range(W)) * (r + 1))
        send = _dev(mine(r)[:k], dtype)
        recv = _dev(np.zeros(k * W), dtype)
        dist.all_gather(send, recv)
        check(f"all_gather {dtype}", _host(recv), np.concatenate([mine(q)[:k] for q in range(W)]))
        a, b = _dev(mine(r), dtype), _dev(mine(r) * 2, dtype)
        side = cupy.cuda.Stream(non_blocking=True)
        with dist.group():  # two roots in one group, on a side stream
            dist.reduce(a[:1000], root=0, op="avg", stream=side)
            dist.reduce(b[1000:], root=W - 1, op="avg", stream=side)
        side.synchronize()
        check(f"grouped reduces {dtype} (root 0)", _host(a)[:1000],
              total[:1000] / W if r == 0 else mine(r)[:1000])
        check(f"grouped reduces {dtype} (root {W - 1})", _host(b)[1000:],
              2 * total[1000:] / W if r == W - 1 else 2 * mine(r)[1000:])
    scalar = cupy.full((), float(r + 1), dtype=cupy.float32)  # the trainer's 0-d loss
    dist.all_reduce(scalar, op="avg")
    check("0-d avg", np.array([float(scalar)]), np.array([sum(range(1, W + 1)) / W]))
    dist.barrier()
    got = dist.broadcast_object({"hello": [1, 2, r]} if r == 0 else None, root=0)
    check("broadcast_object", np.array(got["hello"]), np.array([1, 2, 0]))
    return {"checks": checks}


def dataparallel(dist, out):
    import cupy
    from llmc.config import ModelConfig
    from llmc.model.gpu_model import GPUModel
    from llmc.training.gpu_optim import GPUAdamW
    from llmc.model.params import init_params
    from llmc.dist.zero import DataParallel
    W, r = dist.world_size, dist.rank
    mc = ModelConfig(n_layer=3, n_head=2, n_embd=128, vocab_size=1000, padded_vocab_size=1024,
                     block_size=64)
    B, T, steps = 2, 64, 3
    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, seed=5)
    rng = np.random.default_rng(0)  # the same global batches on every rank
    data = rng.integers(0, mc.vocab_size, (steps, W * B, T + 1)).astype(np.int32)
    p0 = init_params(mc, 1)
    report = {}
    for dtype in ("fp32", "bf16"):
        ref = GPUModel(mc, W * B, T, dtype=dtype)
        ref.load_params(p0)
        ref_opt = GPUAdamW(ref, **hp)
        ref_loss, ref_norm = [], []
        for s in range(steps):
            x, y = (cupy.asarray(np.ascontiguousarray(data[s, :, :-1])),
                    cupy.asarray(np.ascontiguousarray(data[s, :, 1:])))
            ref.zero_grad()
            ref_loss.append(float(ref.forward_backward(x, y, 1.0)))
            ref_norm.append(float(ref_opt.step(1e-3, s)))
        ref_params = ref.params_fp32()
        del ref, ref_opt
        for zero in (0, 1):
            model = GPUModel(mc, B, T, dtype=dtype)
            model.load_params(p0)
            dp = DataParallel(dist, model, zero=zero, bucket_bytes=64 * 1024, **hp)
            losses, norms = [], []
            loss = cupy.zeros((), dtype=cupy.float32)
            for s in range(steps):
                rows = data[s, r * B:(r + 1) * B]
                x, y = (cupy.asarray(np.ascontiguousarray(rows[:, :-1])),
                        cupy.asarray(np.ascontiguousarray(rows[:, 1:])))
                model.zero_grad()
                loss[...] = model.forward_backward(x, y, 1.0, on_layer_grads=dp.hook)
                dp.finish()
                norms.append(float(dp.step(1e-3, s)))
                dist.all_reduce(loss, op="avg")
                losses.append(float(loss))
            params = model.params_fp32()
            tol = 1e-5 if dtype == "fp32" else 2e-2
            rel = lambda a, b: float(np.abs(np.array(a) - np.array(b)).max() / np.abs(np.array(b)).max())  # noqa: E731
            prel = float(np.linalg.norm(params - ref_params) / np.linalg.norm(ref_params))
            upd = float(np.linalg.norm((params - p0) - (ref_params - p0)) / np.linalg.norm(ref_params - p0))
            key = f"{dtype} zero={zero}"
            report[key] = dict(loss=rel(losses, ref_loss), norm=rel(norms, ref_norm), params=prel,
                               update=upd, optimizer_bytes=dp.optimizer_bytes(),
                               buckets=len(dp.buckets))
            # A gradient near zero may change sign with the summation order (two half batches vs
            # one batch), and Adam's first steps move such a weight by +-lr: a few weights may
            # differ by up to 2*lr per step. Everything else must agree.
            off = float(np.mean(np.abs(params - ref_params) > (1e-6 if dtype == "fp32" else 1e-2)))
            report[key]["fraction_off"] = off
            assert report[key]["loss"] <= tol and report[key]["norm"] <= tol, (key, report[key])
            assert float(np.abs(params - ref_params).max()) <= 2 * 1e-3 * steps + 1e-2 * (dtype == "bf16")
            if dtype == "fp32":
                assert off <= 1e-4 and prel <= 1e-4 and upd <= 3e-2, (key, report[key])
            else:
                assert prel <= 1e-2, (key, report[key])
            # every rank ends with the same weights
            mine = cupy.asarray(params)
            same = cupy.asarray(params)
            dist.broadcast(same, root=0)
            assert float(cupy.abs(mine - same).max()) == 0.0, f"{key}: ranks disagree on the weights"
            del model, dp
    z0, z1 = report["fp32 zero=0"]["optimizer_bytes"], report["fp32 zero=1"]["optimizer_bytes"]
    assert z1 <= z0 / W + 2 * 128 * 4 * 3, (z0, z1)
    return report


def hang(dist, out):
    import cupy
    if dist.rank == 1:
        time.sleep(600)  # alive (heartbeats go on), but never joins the collective
    buf = cupy.ones(10, dtype=cupy.float32)
    dist.all_reduce(buf)
    cupy.cuda.get_current_stream().synchronize()
    return {"unexpected": "the all_reduce finished"}


def main(argv):
    out, mode = Path(argv[0]), argv[1]
    from llmc.dist.distributed import init_distributed
    dist = init_distributed()
    result = {"collectives": collectives, "dataparallel": dataparallel, "hang": hang}[mode](dist, out)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
