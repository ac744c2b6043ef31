/* LayerNorm over channels, the residual add, and their fusion.

   forward:  mean = sum(x)/C ; rstd = 1/sqrt(sum((x-mean)^2)/C + eps)
             out = (x - mean) * rstd * weight + bias
   fused:    residual = inp1 + inp2 (stored, rounded to floatX), then LayerNorm of residual
   backward: xhat = (x - mean) * rstd ; g = dout * weight
             dinp    += rstd * (g - mean(g) - xhat * mean(g * xhat))
             dweight += sum over rows of dout * xhat
             dbias   += sum over rows of dout
             dsum    += sum over rows of dinp (after the update, as stored)   [optional]
   dsum is the bias gradient of the linear layer whose output joined the residual stream that
   dinp is the gradient of (attention projection, MLP projection): the backward has every row
   of dinp in registers anyway, so that bias costs no separate pass over (N, C).

   Shapes: x/out/dout/dinp (N, C) with N = B*T, weight/bias (C,), mean/rstd fp32 (N,).
   C a multiple of the 128-bit pack (8 bf16 / 4 fp32). Saved for backward: x, mean, rstd.
   Gradients accumulate (+=).

   Work split: one warp per row; lane l owns packs l, l+32, l+64, ... of the row in every loop,
   so a lane only reads back the shared memory it wrote itself (no syncs inside a row).
   Backward is deterministic: each warp accumulates dweight/dbias for its rows in its own
   shared-memory slice (lane-major, so conflict-free), the block adds the slices in warp order
   into one fp32 partial per block (scratch, (G, K*C), K = 2, or 3 with dsum), and
   layernorm_backward_reduce adds the G partials in block order. The rows a block handles depend only on (N, G, warps per block),
   never on scheduling.
*/
#include "common.cuh"

// LayerNorm of one row already in shared memory (row_s, written by this lane's own packs).
__device__ __forceinline__ void layernorm_row(floatX* out, float* mean, float* rstd,
                                              const floatX* row_s, const floatX* weight,
                                              const floatX* bias, int row, int C, float eps,
                                              float sum) {
    const int lane = threadIdx.x % 32;
    const float m = warp_sum(sum) / C;
    float var = 0.0f;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 x = load128(row_s + c);
        #pragma unroll
        for (int k = 0; k < x128::size; k++) {
            float d = to_float(x[k]) - m;
            var += d * d;
        }
    }
    const float rs = rsqrtf(warp_sum(var) / C + eps);
    floatX* o = out + (long long)row * C;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 x = load128(row_s + c);
        x128 w = load128(weight + c);
        x128 b = load128(bias + c);
        x128 y;
        #pragma unroll
        for (int k = 0; k < x128::size; k++)
            y[k] = from_float<floatX>((to_float(x[k]) - m) * rs * to_float(w[k]) + to_float(b[k]));
        store128(o + c, y);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

// Grid ceil(N / warps), block 32 * warps, dynamic shared memory warps * C * sizeof(floatX).
extern "C" __global__ void layernorm_forward(floatX* out, float* mean, float* rstd,
                                             const floatX* inp, const floatX* weight,
                                             const floatX* bias, int N, int C, float eps) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= N) return;
    floatX* row_s = reinterpret_cast<floatX*>(smem_raw) + warp * C;
    const floatX* x = inp + (long long)row * C;
    float sum = 0.0f;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 v = load128(x + c);
        store128(row_s + c, v);
        #pragma unroll
        for (int k = 0; k < x128::size; k++) sum += to_float(v[k]);
    }
    layernorm_row(out, mean, rstd, row_s, weight, bias, row, C, eps, sum);
}

// Same geometry as layernorm_forward. The statistics are taken of the rounded residual that is
// stored, so the backward (which reads the stored residual) sees exactly the normalized input.
extern "C" __global__ void fused_residual_layernorm_forward(
        floatX* residual, floatX* out, float* mean, float* rstd, const floatX* inp1,
        const floatX* inp2, const floatX* weight, const floatX* bias, int N, int C, float eps) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= N) return;
    floatX* row_s = reinterpret_cast<floatX*>(smem_raw) + warp * C;
    const long long base = (long long)row * C;
    float sum = 0.0f;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 a = load128(inp1 + base + c);
        x128 b = load128(inp2 + base + c);
        x128 r;
        #pragma unroll
        for (int k = 0; k < x128::size; k++) {
            r[k] = from_float<floatX>(to_float(a[k]) + to_float(b[k]));
            sum += to_float(r[k]);
        }
        store128(row_s + c, r);
        store128(residual + base + c, r);
    }
    layernorm_row(out, mean, rstd, row_s, weight, bias, row, C, eps, sum);
}

// out = inp1 + inp2 over n elements; one thread per pack, scalar tail.
extern "C" __global__ void residual_forward(floatX* out, const floatX* inp1, const floatX* inp2,
                                            long long n) {
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= n) return;
    if (i + x128::size <= n) {
        x128 a = load128cs(inp1 + i);
        x128 b = load128cs(inp2 + i);
        x128 r;
        #pragma unroll
        for (int k = 0; k < x128::size; k++)
            r[k] = from_float<floatX>(to_float(a[k]) + to_float(b[k]));
        store128(out + i, r);
    } else {
        for (long long j = i; j < n; j++)
            out[j] = from_float<floatX>(to_float(inp1[j]) + to_float(inp2[j]));
    }
}

// ---------------------------------------------------------------------------------------------
// backward

// Grid G blocks, block 32 * warps; block g takes rows g*warps + w, then + G*warps, ... Dynamic
// shared memory K * warps * Cpad floats (K = 3 with dsum, else 2), Cpad = C rounded up to 32
// packs: each warp's dweight, dbias (and dsum) accumulators, stored lane-major (element k of
// the lane's j-th pack at (j * size + k) * 32 + lane) so the 32 lanes of a warp hit 32
// different banks. Writes the block's partial sums to partial[g, 0:C] (dweight),
// partial[g, C:2C] (dbias) and, with dsum, partial[g, 2C:3C].
extern "C" __global__ void layernorm_backward(floatX* dinp, float* partial, const floatX* dout,
                                              const floatX* inp, const floatX* weight,
                                              const float* mean, const float* rstd, int N, int C,
                                              int with_dsum) {
    extern __shared__ __align__(16) float acc_s[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int chunk = 32 * x128::size;
    const int Cpad = (C + chunk - 1) / chunk * chunk;
    const int K = with_dsum ? 3 : 2;
    float* dw_s = acc_s + warp * K * Cpad;
    float* db_s = dw_s + Cpad;
    float* ds_s = db_s + Cpad;  // with_dsum only
    for (int i = lane; i < Cpad; i += 32) dw_s[i] = db_s[i] = 0.0f;
    if (with_dsum) for (int i = lane; i < Cpad; i += 32) ds_s[i] = 0.0f;
    for (int row = blockIdx.x * warps + warp; row < N; row += gridDim.x * warps) {
        const long long base = (long long)row * C;
        const float m = mean[row], rs = rstd[row];
        float s_g = 0.0f, s_gx = 0.0f;
        for (int c = lane * x128::size; c < C; c += chunk) {
            x128 dy = load128(dout + base + c);
            x128 x = load128(inp + base + c);
            x128 w = load128(weight + c);
            #pragma unroll
            for (int k = 0; k < x128::size; k++) {
                float g = to_float(dy[k]) * to_float(w[k]);
                s_g += g;
                s_gx += g * (to_float(x[k]) - m) * rs;
            }
        }
        const float g_mean = warp_sum(s_g) / C, gx_mean = warp_sum(s_gx) / C;
        // Second pass rereads the row (still in L1/L2) rather than holding it in registers.
        for (int c = lane * x128::size, a = lane; c < C; c += chunk, a += chunk) {
            x128 dy = load128cs(dout + base + c);
            x128 x = load128cs(inp + base + c);
            x128 w = load128(weight + c);
            x128 di = load128(dinp + base + c);
            #pragma unroll
            for (int k = 0; k < x128::size; k++) {
                float d = to_float(dy[k]);
                float xh = (to_float(x[k]) - m) * rs;
                float g = d * to_float(w[k]);
                di[k] = from_float<floatX>(to_float(di[k]) + rs * (g - g_mean - xh * gx_mean));
                dw_s[a + 32 * k] += d * xh;
                db_s[a + 32 * k] += d;
                if (with_dsum) ds_s[a + 32 * k] += to_float(di[k]);  // the value stored
            }
            store128(dinp + base + c, di);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const int a = (c / chunk) * chunk + (c % x128::size) * 32 + (c % chunk) / x128::size;
        float* dst = partial + (long long)blockIdx.x * K * C + c;
        for (int j = 0; j < K; j++) {
            float sum = 0.0f;
            for (int w = 0; w < warps; w++) sum += acc_s[(w * K + j) * Cpad + a];
            dst[j * C] = sum;
        }
    }
}

// dweight += column sums of partial[:, 0:C], dbias += those of partial[:, C:2C] and, when dsum
// is not null, dsum += those of partial[:, 2C:3C]; summed over the G rows in order. Grid
// ceil(K*C / 32) (K = 3 with dsum, else 2), block (32, 32).
extern "C" __global__ void layernorm_backward_reduce(floatX* dweight, floatX* dbias, floatX* dsum,
                                                     const float* partial, int G, int C) {
    __shared__ float scratch[32 * 32];
    const int K = dsum != nullptr ? 3 : 2;
    const float sum = column_sum_fixed_order(partial, G, K * C, scratch);
    const int col = blockIdx.x * 32 + threadIdx.x;
    if (threadIdx.y != 0 || col >= K * C) return;
    floatX* dst = col < C ? dweight + col : col < 2 * C ? dbias + (col - C) : dsum + (col - 2 * C);
    *dst = from_float<floatX>(to_float(*dst) + sum);
}
