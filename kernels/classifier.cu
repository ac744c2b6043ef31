// Fused classifier: softmax cross-entropy over the V real columns of padded logits, giving the
// loss and (optionally) dlogits written in place over the logits, one block per row.
//
//   loss[n]      = logsumexp(logits[n, :V]) - logits[n, target[n]]            losses f32 (N,) `=`
//   logits[n, j] = dloss * (softmax(logits[n, :V])_j - [j == target[n]])  j < V   (in place, `=`)
//   logits[n, j] = 0                                                  V <= j < Vp
// Shapes: logits (N, Vp) floatX with Vp * sizeof(floatX) a multiple of 16 bytes; targets int32
// (N,). Nothing is saved: the probabilities live only in registers of the block that made them
// (no fp32 (N, Vp) buffer ever exists).
//
// Traffic: pass 1 reads the row once with 128-bit loads and keeps a running (max, sum) per thread
// (online softmax: one pass instead of a max pass plus a sum pass). Pass 2 rereads the row to
// write dlogits; the row (100 KB in bf16 at Vp = 50304) was read microseconds earlier by the same
// block, so the reread is served by L2 and DRAM sees one read and one write per element. Pass 1
// loads with the default policy (keep in cache for the reread), pass 2 with a streaming hint
// (last use). Padded columns are written as zeros without being read.
//
// A target outside [0, V) cannot be checked on the host without a device sync; the kernel makes
// the row's loss NaN instead (loud in the mean loss) and leaves the one-hot term out of dlogits.
// Deterministic: fixed-order block reductions, no atomics.
#include "common.cuh"

// 16-byte chunks a thread loads before using them, in pass 1 and in pass 2 (measured on the
// H200, see docs/RESULTS.md)
#define CLS_UNROLL1 2
#define CLS_UNROLL2 2

extern "C" __global__ void fused_classifier(floatX* logits, float* __restrict__ losses,
                                            const int* __restrict__ targets, float dloss, int V,
                                            int Vp, int write_dlogits) {
    __shared__ float scratch[32];
    constexpr int P = x128::size;
    floatX* x = logits + (size_t)blockIdx.x * Vp;
    const int target = targets[blockIdx.x];
    const bool valid = target >= 0 && target < V;
    // Read before any thread may overwrite the row (the reductions below are block barriers).
    const float x_target = (threadIdx.x == 0 && valid) ? to_float(x[target]) : 0.0f;

    const int real_chunks = (V + P - 1) / P;  // chunks holding at least one column < V
    const int stride = blockDim.x;
    float m = NEG_INF, s = 0.0f;
    // A thread's chunks are c = threadIdx.x + i * stride, taken in order of i; CLS_UNROLL1 of
    // them are loaded before any is used (CLS_UNROLL2 in pass 2), so that enough bytes are in
    // flight per SM.
    for (int c0 = threadIdx.x; c0 < real_chunks; c0 += CLS_UNROLL1 * stride) {
        x128 packed[CLS_UNROLL1];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL1; u++)
            if (c0 + u * stride < real_chunks) packed[u] = load128(x + (c0 + u * stride) * P);
#pragma unroll
        for (int u = 0; u < CLS_UNROLL1; u++) {
            const int c = c0 + u * stride;
            if (c >= real_chunks) break;
            float v[P];
            float cm = NEG_INF;
#pragma unroll
            for (int k = 0; k < P; k++) {
                v[k] = c * P + k < V ? to_float(packed[u][k]) : NEG_INF;
                cm = fmaxf(cm, v[k]);
            }
            // cm is finite (every chunk here has a real column), so m_new is too: no inf - inf.
            const float m_new = fmaxf(m, cm);
            s *= __expf(m - m_new);
#pragma unroll
            for (int k = 0; k < P; k++) s += __expf(v[k] - m_new);
            m = m_new;
        }
    }
    const float row_max = block_max(m, scratch);
    // Threads that saw no chunk have m = -inf and s = 0: exp(-inf) = 0 keeps them out.
    const float row_sum = block_sum(s * __expf(m - row_max), scratch);
    if (threadIdx.x == 0) {
        losses[blockIdx.x] = valid ? row_max + logf(row_sum) - x_target : __int_as_float(0x7fc00000);
    }
    if (!write_dlogits) return;

    const float inv_sum = 1.0f / row_sum;
    const int all_chunks = Vp / P;
    for (int c0 = threadIdx.x; c0 < all_chunks; c0 += CLS_UNROLL2 * stride) {
        x128 packed[CLS_UNROLL2];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL2; u++)  // every load before any store of this group
            if (c0 + u * stride < real_chunks) packed[u] = load128cs(x + (c0 + u * stride) * P);
#pragma unroll
        for (int u = 0; u < CLS_UNROLL2; u++) {
            const int c = c0 + u * stride;
            if (c >= all_chunks) break;
            x128 out;
#pragma unroll
            for (int k = 0; k < P; k++) {
                const int j = c * P + k;
                float g = 0.0f;
                if (j < V) {
                    const float p = __expf(to_float(packed[u][k]) - row_max) * inv_sum;
                    g = dloss * (p - (j == target ? 1.0f : 0.0f));
                }
                out[k] = from_float<floatX>(g);  // padded columns (j >= V) are written as 0
            }
            // Default store policy: the lm-head backward matmul reads dlogits next.
            store128(x + c * P, out);
        }
    }
}

// Mean of the per-row losses, one block: mean[0] = sum_n losses[n] / N  (f32 `=`).
// Each thread sums a fixed strided set of rows, then a fixed-order block tree: the same bits run
// to run, and no temporary buffer (CuPy's own mean reduces through CUB, which allocates scratch
// memory: a captured training step must not allocate).
extern "C" __global__ void mean_loss(float* __restrict__ mean, const float* __restrict__ losses,
                                     int N) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int n = threadIdx.x; n < N; n += blockDim.x) s += losses[n];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) mean[0] = s / (float)N;
}
