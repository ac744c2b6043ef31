// Causal self-attention, the "matmul" method (any dtype, any head size). The two batched
// products per direction are cuBLAS calls made from llmc/ops/attention.py; this file holds the
// head permutes and the causal softmax, forward and backward.
//
// Forward, scale = 1/sqrt(HS):
//   q, k, v = split_heads(qkv)               qkv (B, T, 3C) -> (3, B, NH, T, HS)
//   preatt  = scale * q @ k^T                (B, NH, T, T)           cuBLAS
//   att     = softmax over keys t2 <= t      (B, NH, T, T), 0 for t2 > t
//   y       = att @ v                        (B, NH, T, HS)          cuBLAS
//   out     = merge_heads(y)                 (B, T, C)
// Saved for the backward: att (B, NH, T, T) floatX (zeros above the diagonal, so the backward
// products need no mask). q, k, v are recomputed from qkv by split_heads.
// Backward:
//   dy = split_heads(dout); datt = dy @ v^T; dv = att^T @ dy
//   dpreatt = scale * att * (datt - sum_t2 att * datt)      (row-wise, t2 <= t; 0 above)
//   dq = dpreatt @ k; dk = dpreatt^T @ q; dqkv = merge_heads(dq, dk, dv)      dqkv `=`
//
// Softmax kernels: one warp per (b, h, t) row, fp32 math, __expf (memory-bound; its error is
// ~1e-7 relative at the argument range of a max-shifted softmax).
#include "common.cuh"

// out[p, b, h, t, d] = inp[b, t, p*C + h*HS + d] for p < parts: split the `parts` (B, T, C)
// slabs interleaved in inp (B, T, parts*C) into head-major (parts, B, NH, T, HS) blocks.
// One thread per (b, t, c); reads and writes are both coalesced along c / d.
extern "C" __global__ void split_heads(floatX* __restrict__ out, const floatX* __restrict__ inp,
                                       int parts, int B, int T, int NH, int HS) {
    const int C = NH * HS;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // < B*T*C < 2^31 (checked by the launcher)
    if (i >= B * T * C) return;
    const int c = i % C, bt = i / C;
    const int t = bt % T, b = bt / T;
    const int h = c / HS, d = c % HS;
    const size_t slab = (size_t)B * T * C;  // elements of one (B, NH, T, HS) block
    const size_t dst = ((size_t)(b * NH + h) * T + t) * HS + d;
    const floatX* src = inp + (size_t)bt * parts * C + c;
    for (int p = 0; p < parts; p++) out[p * slab + dst] = src[(size_t)p * C];
}

// out[b, t, p*C + h*HS + d] = inp[p, b, h, t, d]: the inverse of split_heads (`=`).
extern "C" __global__ void merge_heads(floatX* __restrict__ out, const floatX* __restrict__ inp,
                                       int parts, int B, int T, int NH, int HS) {
    const int C = NH * HS;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * T * C) return;
    const int c = i % C, bt = i / C;
    const int t = bt % T, b = bt / T;
    const int h = c / HS, d = c % HS;
    const size_t slab = (size_t)B * T * C;
    const size_t src = ((size_t)(b * NH + h) * T + t) * HS + d;
    floatX* dst = out + (size_t)bt * parts * C + c;
    for (int p = 0; p < parts; p++) dst[(size_t)p * C] = inp[p * slab + src];
}

// att[r, t2] = exp(preatt[r, t2] - max) / sum for t2 <= t, 0 for t2 > t, over rows r = (b, h, t)
// of (B*NH*T, T). preatt already carries the 1/sqrt(HS) scale (cuBLAS alpha). att may alias
// preatt (the model softmaxes in place): each lane rereads and rewrites only its own elements,
// and every read of the row precedes the warp reduction that every write follows.
extern "C" __global__ void softmax_causal_forward(floatX* att, const floatX* preatt, int rows, int T) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // whole warps exit together: the shuffles below stay full-warp
    const int t = row % T;
    const floatX* x = preatt + (size_t)row * T;
    floatX* y = att + (size_t)row * T;

    // Online max and sum, one exp per element: rescale the running sum only when the max moves.
    float m = NEG_INF, s = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        const float v = to_float(x[j]);
        if (v > m) {
            s = s * __expf(m - v) + 1.0f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    const float M = warp_max(m);  // finite: key 0 is visible to every query
    s = (m == NEG_INF) ? 0.0f : s * __expf(m - M);  // lanes past t saw no key
    const float inv = 1.0f / warp_sum(s);

    for (int j = lane; j < T; j += 32) {
        const float p = j <= t ? __expf(to_float(x[j]) - M) * inv : 0.0f;
        y[j] = from_float<floatX>(p);
    }
}

// dpreatt[r, t2] = scale * att * (datt - sum_t2' att * datt) for t2 <= t, 0 above the diagonal.
// dpreatt may alias datt (in place, same argument as the forward).
extern "C" __global__ void softmax_causal_backward(floatX* dpreatt, const floatX* datt,
                                                   const floatX* __restrict__ att, int rows, int T,
                                                   float scale) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int t = row % T;
    const size_t off = (size_t)row * T;

    float dot = 0.0f;
    for (int j = lane; j <= t; j += 32) dot += to_float(att[off + j]) * to_float(datt[off + j]);
    dot = warp_sum(dot);

    for (int j = lane; j < T; j += 32) {
        float g = 0.0f;
        if (j <= t) g = scale * to_float(att[off + j]) * (to_float(datt[off + j]) - dot);
        dpreatt[off + j] = from_float<floatX>(g);
    }
}
