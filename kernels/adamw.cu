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

__device__ __forceinline__ bool decayed(long long gi, const long long* ranges, int n_ranges) {
    for (int r = 0; r < n_ranges; r++)
        if (gi >= ranges[2 * r] && gi < ranges[2 * r + 1]) return true;
    return false;
}

// One thread per 128-bit pack of params (8 bf16 / 4 fp32 elements); the pack that runs past n
// takes the scalar path. `ranges` is (n_ranges, 2) int64 [start, stop) of the decayed tensors
// in global element indices. seed and step give the rounding bits their stream.
extern "C" __global__ void adamw_update(floatX* params, float* master, const floatX* grads,
                                        float* m, float* v, const float* norm_sq,
                                        const long long* ranges, int n_ranges, long long n,
                                        long long offset, float lr, float beta1, float beta2,
                                        float eps, float weight_decay, int step, float grad_clip,
                                        unsigned int seed) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i0 >= n) return;
    float clip = 1.0f;
    if (grad_clip > 0.0f) clip = fminf(1.0f, grad_clip / (sqrtf(*norm_sq) + 1e-6f));
    const float bc1 = 1.0f - powf(beta1, (float)step);
    const float bc2 = 1.0f - powf(beta2, (float)step);
    const unsigned int stream_seed = hash_u32((unsigned int)step, seed);
    float* p32 = master != nullptr ? master : reinterpret_cast<float*>(params);

    float g[x128::size], pm[x128::size], mm[x128::size], vv[x128::size];
    const int cnt = (int)min((long long)x128::size, n - i0);
    const bool full = cnt == x128::size;
    if (full) {
        x128 gp = load128cs(grads + i0);
        #pragma unroll
        for (int k = 0; k < x128::size; k++) g[k] = to_float(gp[k]);
        #pragma unroll
        for (int q = 0; q < x128::size; q += f128::size) {
            f128 a = load128cs(p32 + i0 + q), b = load128cs(m + i0 + q), c = load128cs(v + i0 + q);
            #pragma unroll
            for (int k = 0; k < f128::size; k++) {
                pm[q + k] = a[k];
                mm[q + k] = b[k];
                vv[q + k] = c[k];
            }
        }
    } else {
        for (int k = 0; k < cnt; k++) {
            g[k] = to_float(grads[i0 + k]);
            pm[k] = p32[i0 + k];
            mm[k] = m[i0 + k];
            vv[k] = v[i0 + k];
        }
    }

    x128 out;
    #pragma unroll
    for (int k = 0; k < x128::size; k++) {
        if (k >= cnt) break;
        const long long gi = offset + i0 + k;
        const float gk = clip * g[k];
        mm[k] = beta1 * mm[k] + (1.0f - beta1) * gk;
        vv[k] = beta2 * vv[k] + (1.0f - beta2) * gk * gk;
        const float mhat = mm[k] / bc1, vhat = vv[k] / bc2;
        const float wd = decayed(gi, ranges, n_ranges) ? weight_decay : 0.0f;
        pm[k] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * pm[k]);
        store_rounded(&out[k], pm[k], hash_u32((unsigned int)gi, stream_seed));
    }

    if (full) {
        #pragma unroll
        for (int q = 0; q < x128::size; q += f128::size) {
            f128 a, b, c;
            #pragma unroll
            for (int k = 0; k < f128::size; k++) {
                a[k] = pm[q + k];
                b[k] = mm[q + k];
                c[k] = vv[q + k];
            }
            if (master != nullptr) store128cs(master + i0 + q, a);
            store128cs(m + i0 + q, b);
            store128cs(v + i0 + q, c);
        }
        store128(params + i0, out);
    } else {
        for (int k = 0; k < cnt; k++) {
            if (master != nullptr) master[i0 + k] = pm[k];
            m[i0 + k] = mm[k];
            v[i0 + k] = vv[k];
            params[i0 + k] = out[k];
        }
    }
}
