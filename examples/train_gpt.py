"""A custom training loop: a small GPT built from llmc's ops, trained on one CUDA GPU.

Two layers, C=128, two heads of 64, bf16 weights with fp32 master copies. Every layer's forward
and backward is one functional op of llmc.ops (each allocates its outputs: simple, not fast;
llmc/model/gpu_model.py does the same with the out= forms into buffers allocated once). The model
learns a fixed cycle through its 64 tokens; the loss falls from ln(64) = 4.16 to near 0.
Run:  python examples/train_gpt.py
"""
import ml_dtypes
import numpy as np

from llmc import ops
from llmc.config import ModelConfig
from llmc.model.params import init_params, views

mc = ModelConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=64, padded_vocab_size=64,
                 block_size=64)
B, T, L, NH, V = 4, 64, mc.n_layer, mc.n_head, mc.vocab_size
LAYER = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
         "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")
P = {}  # "wte", "wpe", "lnfw", "lnfb", and "qkvw0", "qkvw1", ... per layer: bf16 on the device
for name, a in views(init_params(mc, seed=0), mc).items():
    for l, part in (enumerate(a) if name in LAYER else [("", a)]):
        P[f"{name}{l}"] = ops.to_device(part.astype(ml_dtypes.bfloat16))


def forward_backward(inp, tgt):
    """Mean loss (a 0-d device array) and the gradient of every parameter, by name."""
    x, saved, G = ops.encoder(inp, P["wte"], P["wpe"]), [], {}
    for l in range(L):
        p = {k: P[f"{k}{l}"] for k in LAYER}
        h1, s1 = ops.layernorm(x, p["ln1w"], p["ln1b"])
        qkv = ops.matmul(h1, p["qkvw"], p["qkvb"])
        a, sa = ops.attention(qkv, NH)
        x2 = ops.residual(x, ops.matmul(a, p["attprojw"], p["attprojb"]))
        h2, s2 = ops.layernorm(x2, p["ln2w"], p["ln2b"])
        f = ops.matmul(h2, p["fcw"], p["fcb"])
        fg = ops.gelu(f)
        saved.append((x, h1, s1, qkv, a, sa, x2, h2, s2, f, fg))
        x = ops.residual(x2, ops.matmul(fg, p["fcprojw"], p["fcprojb"]))
    hf, sf = ops.layernorm(x, P["lnfw"], P["lnfb"])
    logits = ops.matmul(hf, P["wte"]).reshape(B * T, -1)  # the head shares wte
    losses, dlogits = ops.cross_entropy_grad(logits, tgt.reshape(-1), V)  # d(mean loss)

    dhf, G["wte"], _ = ops.matmul_grad(dlogits, hf, P["wte"], has_bias=False)
    dx, G["lnfw"], G["lnfb"] = ops.layernorm_grad(dhf, x, P["lnfw"], sf)
    for l in reversed(range(L)):
        p = {k: P[f"{k}{l}"] for k in LAYER}
        x, h1, s1, qkv, a, sa, x2, h2, s2, f, fg = saved[l]
        dfg, G[f"fcprojw{l}"], G[f"fcprojb{l}"] = ops.matmul_grad(dx, fg, p["fcprojw"])
        dh2, G[f"fcw{l}"], G[f"fcb{l}"] = ops.matmul_grad(ops.gelu_grad(f, dfg), h2, p["fcw"])
        d, G[f"ln2w{l}"], G[f"ln2b{l}"] = ops.layernorm_grad(dh2, x2, p["ln2w"], s2)
        dx2 = ops.residual(dx, d)  # the residual stream's gradient adds both paths
        da, G[f"attprojw{l}"], G[f"attprojb{l}"] = ops.matmul_grad(dx2, a, p["attprojw"])
        dqkv = ops.attention_grad(da, qkv, a, sa, NH)
        dh1, G[f"qkvw{l}"], G[f"qkvb{l}"] = ops.matmul_grad(dqkv, h1, p["qkvw"])
        d, G[f"ln1w{l}"], G[f"ln1b{l}"] = ops.layernorm_grad(dh1, x, p["ln1w"], s1)
        dx = ops.residual(dx2, d)
    dwte, G["wpe"] = ops.encoder_grad(dx, inp, P["wte"].shape, P["wpe"].shape)
    G["wte"] = ops.residual(G["wte"], dwte)  # wte's two uses
    return losses.mean(), G


# AdamW on fp32 master weights, one fused launch per tensor; decay on matrices only
master = {k: ops.to_device(ops.to_host(p).astype(np.float32).reshape(-1)) for k, p in P.items()}
m = {k: ops.zeros(p.size, "fp32") for k, p in P.items()}
v = {k: ops.zeros(p.size, "fp32") for k, p in P.items()}
everything = {k: ops.decay_table([(0, p.size, True)]) for k, p in P.items()}

cycle = np.tile(np.random.default_rng(0).permutation(V), 3).astype(np.int32)
rows = np.stack([cycle[7 * b:7 * b + T + 1] for b in range(B)])
inp, tgt = ops.to_device(rows[:, :-1]), ops.to_device(rows[:, 1:])
for step in range(1, 101):
    loss, G = forward_backward(inp, tgt)
    norm_sq = ops.global_norm(*(g.reshape(-1) for g in G.values()))  # for clipping at 1.0
    for k, p in P.items():
        ops.adamw_update(p.reshape(-1), master[k], G[k].reshape(-1), m[k], v[k], norm_sq,
                         lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                         weight_decay=0.1 if p.ndim == 2 else 0.0, step=step, grad_clip=1.0,
                         seed=0, ranges=everything[k])
    if step == 1 or step % 25 == 0:
        print(f"step {step:3d}  loss {float(loss):.4f}")
