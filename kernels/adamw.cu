/* AdamW over the flat parameter buffer, with global-norm gradient clipping on the device.

   norm:   norm_sq = sum(g^2)  over the flat gradient buffer (or this rank's shard of it)
   update: clip = grad_clip > 0 ? min(1, grad_clip / (sqrt(norm_sq) + 1e-6)) : 1 ; g = clip * grad
           m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
           mhat = m / (1 - b1^t) ;  vhat = v / (1 - b2^t)
           p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)     wd only inside a decayed range
           params = p, rounded stochastically to bf16 (round-to-nearest never moves a weight
           whose update is below half a bf16 step; stochastic rounding moves it on average)

   Shapes: n elements: params floatX, master/m/v fp32, grads floatX. Element i of these buffers
   is element offset + i of the whole model (ZeRO shards pass their start), which places it in
   the decay table and seeds its rounding bits, so a sharded update equals the unsharded one.
   master == NULL: the fp32 module updates params in place (they are the fp32 master).
   All buffers 16-byte aligned. The norm is deterministic: fixed per-block partials, then one
   block adds them in a fixed order.
*/
#include "common.cuh"

// Grid G, block BS (multiple of 32): thread k of the grid takes packs k, k + G*BS, ... Writes
// partial[blockIdx.x] = this block's sum of squares.
extern "C" __global__ void norm_squared_partial(float* partial, const floatX* grads, long long n) {
    __shared__ float scratch[32];
    const long long stride = (long long)gridDim.x * blockDim.x * x128::size;
    float acc = 0.0f;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size; i < n;
         i += stride) {
        if (i + x128::size <= n) {
            x128 g = load128cs(grads + i);
            #pragma unroll
            for (int k = 0; k < x128::size; k++) {
                float f = to_float(g[k]);
                acc += f * f;
            }
        } else {
            for (long long j = i; j < n; j++) {
                float f = to_float(grads[j]);
                acc += f * f;
            }
        }
    }
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// out[0] = sum of partial[0..G) in a fixed order. One block (multiple of 32 threads).
extern "C" __global__ void norm_squared_final(float* out, const float* partial, int G) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int g = threadIdx.x; g < G; g += blockDim.x) acc += partial[g];
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = total;
}

// The decayed ranges are sorted and disjoint (ops/adamw.decay_table). first_range_ending_after
// finds by bisection the first range whose stop lies past gi; decayed_at then walks that cursor
// forward as gi grows, so a pack of elements costs one search plus O(1) per element instead of a
// scan of every range per element.
__device__ __forceinline__ int first_range_ending_after(long long gi, const long long* ranges,
                                                        int n_ranges) {
    int lo = 0, hi = n_ranges;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (ranges[2 * mid + 1] <= gi) lo = mid + 1; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ bool decayed_at(long long gi, const long long* ranges, int n_ranges,
                                           int& r) {
    while (r < n_ranges && ranges[2 * r + 1] <= gi) r++;
    return r < n_ranges && gi >= ranges[2 * r];
}

// The AdamW update of one element: returns the new master value; m and v updated in place.
__device__ __forceinline__ float adamw_element(float p, float g, float& m, float& v, float lr,
                                               float beta1, float beta2, float bc1, float bc2,
                                               float eps, float wd) {
    m = beta1 * m + (1.0f - beta1) * g;
    v = beta2 * v + (1.0f - beta2) * g * g;
    const float mhat = m / bc1, vhat = v / bc2;
    return p - lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
}

// One thread per 128-bit pack of params (8 bf16 / 4 fp32 elements); the pack that runs past n
// takes a scalar path. `ranges` is (n_ranges, 2) int64 [start, stop) of the decayed tensors
// in global element indices, sorted and disjoint. seed and step give the rounding bits their stream.
extern "C" __global__ void adamw_update(floatX* params, float* master, const floatX* grads,
                                        float* m, float* v, const float* norm_sq,
                                        const long long* ranges, int n_ranges, long long n,
                                        long long offset, float lr, float beta1, float beta2,
                                        float eps, float weight_decay, int step, float grad_clip,
                                        unsigned int seed) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i0 >= n) return;
    float* p32 = master != nullptr ? master : reinterpret_cast<float*>(params);
    // A whole pack's loads are issued first, before the set-up below (the clip factor, the bias
    // corrections, the bisection over the decay ranges: chains of dependent loads and math), so
    // that their latency overlaps the pack's memory traffic instead of preceding it. Every load
    // of the pack is issued before any store (the stores could alias the loads, which would
    // otherwise serialise them). Parameters are read and written once per step: streaming hints
    // keep them out of L2's way.
    constexpr int Q = x128::size / f128::size;  // fp32 quads per pack: 2 for bf16, 1 for fp32
    const bool whole = i0 + x128::size <= n;
    x128 g;
    f128 pp[Q], mm[Q], vv[Q];
    if (whole) {
        g = load128cs(grads + i0);
        #pragma unroll
        for (int q = 0; q < Q; q++) {
            pp[q] = load128cs(p32 + i0 + q * f128::size);
            mm[q] = load128cs(m + i0 + q * f128::size);
            vv[q] = load128cs(v + i0 + q * f128::size);
        }
    }
    float clip = 1.0f;
    if (grad_clip > 0.0f) clip = fminf(1.0f, grad_clip / (sqrtf(*norm_sq) + 1e-6f));
    const float bc1 = 1.0f - powf(beta1, (float)step);
    const float bc2 = 1.0f - powf(beta2, (float)step);
    const unsigned int stream_seed = hash_u32((unsigned int)step, seed);

    int r = first_range_ending_after(offset + i0, ranges, n_ranges);

    if (!whole) {  // the last, partial pack: element by element
        for (long long i = i0; i < n; i++) {
            const long long gi = offset + i;
            const float wd = decayed_at(gi, ranges, n_ranges, r) ? weight_decay : 0.0f;
            float mi = m[i], vi = v[i];
            const float p = adamw_element(p32[i], clip * to_float(grads[i]), mi, vi, lr, beta1,
                                          beta2, bc1, bc2, eps, wd);
            m[i] = mi;
            v[i] = vi;
            if (master != nullptr) master[i] = p;
            store_rounded(params + i, p, hash_u32((unsigned int)gi, stream_seed));
        }
        return;
    }
    x128 out;
    #pragma unroll
    for (int q = 0; q < Q; q++) {
        #pragma unroll
        for (int k = 0; k < f128::size; k++) {
            const int e = q * f128::size + k;
            const long long gi = offset + i0 + e;
            const float wd = decayed_at(gi, ranges, n_ranges, r) ? weight_decay : 0.0f;
            pp[q][k] = adamw_element(pp[q][k], clip * to_float(g[e]), mm[q][k], vv[q][k], lr,
                                     beta1, beta2, bc1, bc2, eps, wd);
            store_rounded(&out[e], pp[q][k], hash_u32((unsigned int)gi, stream_seed));
        }
    }
    #pragma unroll
    for (int q = 0; q < Q; q++) {
        if (master != nullptr) store128cs(master + i0 + q * f128::size, pp[q]);
        store128cs(m + i0 + q * f128::size, mm[q]);
        store128cs(v + i0 + q * f128::size, vv[q]);
    }
    store128(params + i0, out);
}
