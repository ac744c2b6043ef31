/* Matmul bias gradient, and few-row products: the parts of a linear layer that cuBLASLt does
   not do well (llmc/cublaslt.py does the products, the forward's bias and the fused GELU
   backward).

   forward:  out = inp @ weight.T + bias       (cuBLASLt, bias epilogue)
   backward: dbias[oc] += sum over n of dout[n, oc]

   Shapes: inp (N, C), weight (OC, C), bias (OC,), out/dout (N, OC), N = B*T. OC a multiple of
   the 128-bit pack (8 bf16 / 4 fp32). dinp/dweight come from cuBLASLt (dinp =, dweight +=);
   dbias accumulates (+=).

   dbias is deterministic and two-pass: bias_backward_partial gives each (column chunk, row
   chunk) block its fixed rows and writes fp32 column partials (G, OC); bias_backward_reduce
   adds the G partials in order. (cuBLASLt's BGRADB epilogue made the dweight product slower
   than the product plus these two kernels.)
*/
#include "common.cuh"

// Block (32, BY): threadIdx.x owns one pack of the 32-pack column chunk blockIdx.x; the block
// covers rows [blockIdx.y * rows_per_block, + rows_per_block), thread row y taking rows y,
// y + BY, ... in order. Partials of the BY thread rows are added in y order in shared memory
// (32 * BY * size floats), and written to partial[blockIdx.y, chunk columns].
extern "C" __global__ void bias_backward_partial(float* partial, const floatX* dout, int N, int OC,
                                                 int rows_per_block) {
    extern __shared__ __align__(16) float part_s[];
    const int c = (blockIdx.x * 32 + threadIdx.x) * x128::size;
    const int r0 = blockIdx.y * rows_per_block;
    const int r1 = min(r0 + rows_per_block, N);
    float acc[x128::size];
    #pragma unroll
    for (int k = 0; k < x128::size; k++) acc[k] = 0.0f;
    if (c < OC) {
        #pragma unroll 4
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            // dout is also read by the two cuBLAS products of the backward: keep it cached.
            x128 d = load128(dout + (long long)r * OC + c);
            #pragma unroll
            for (int k = 0; k < x128::size; k++) acc[k] += to_float(d[k]);
        }
    }
    float* mine = part_s + (threadIdx.y * 32 + threadIdx.x) * x128::size;
    #pragma unroll
    for (int k = 0; k < x128::size; k++) mine[k] = acc[k];
    __syncthreads();
    if (threadIdx.y != 0 || c >= OC) return;
    for (int y = 1; y < blockDim.y; y++) {
        const float* other = part_s + (y * 32 + threadIdx.x) * x128::size;
        #pragma unroll
        for (int k = 0; k < x128::size; k++) acc[k] += other[k];
    }
    float* dst = partial + (long long)blockIdx.y * OC + c;
    #pragma unroll
    for (int k = 0; k < x128::size; k++) dst[k] = acc[k];
}

// dbias += column sums of partial (G, OC), in row order. Grid ceil(OC / 32), block (32, 32).
extern "C" __global__ void bias_backward_reduce(floatX* dbias, const float* partial, int G,
                                                int OC) {
    __shared__ float scratch[32 * 32];
    const float sum = column_sum_fixed_order(partial, G, OC, scratch);
    const int col = blockIdx.x * 32 + threadIdx.x;
    if (threadIdx.y != 0 || col >= OC) return;
    dbias[col] = from_float<floatX>(to_float(dbias[col]) + sum);
}

// Few-row products (text generation): out (M, OC) = inp (M, C) @ weight (OC, C)^T (+ bias),
// with the tanh GELU applied when `gelu` is set, M <= MV_MAX_ROWS. At such M the whole cost is
// reading the weights once, which cuBLAS's small-M kernels do at ~1 TB/s for GPT-2's layer
// shapes; here the weights stream through 16-byte loads from every SM. Block: 256 threads =
// MV_THREADS / tpc columns x tpc threads per column (tpc a power of two >= 32 chosen by the
// launcher); a thread dots its packs of the weight row with the M input rows (kept as floatX in
// dynamic shared memory, M * C), then the column's threads reduce in a fixed order.
//   matvec_layernorm_forward: the same product of LayerNorm(inp1 + inp2) (inp2 may be null),
//   the residual inp1 + inp2 rounded to floatX and stored by block 0 (as the fused residual
//   LayerNorm kernel stores it); every block normalizes the M rows itself, one warp a row,
//   which at M <= 8 costs less than the launch it saves.
#define MV_MAX_ROWS 8
#define MV_THREADS 256

__device__ __forceinline__ void matvec_rows(floatX* __restrict__ out, const floatX* xs,
                                            const floatX* __restrict__ weight,
                                            const floatX* __restrict__ bias, int M, int C, int OC,
                                            int tpc, int gelu) {
    __shared__ float red[MV_MAX_ROWS][MV_THREADS / 32];
    const int packs = C / x128::size;
    const int col = threadIdx.x / tpc, t = threadIdx.x % tpc;
    const int o = blockIdx.x * (MV_THREADS / tpc) + col;
    float acc[MV_MAX_ROWS];
#pragma unroll
    for (int m = 0; m < MV_MAX_ROWS; m++) acc[m] = 0.0f;
    if (o < OC) {
        const floatX* wrow = weight + (long long)o * C;
#pragma unroll 4
        for (int p = t; p < packs; p += tpc) {
            const x128 w = load128cs(wrow + p * x128::size);
#pragma unroll
            for (int m = 0; m < MV_MAX_ROWS; m++) {
                if (m >= M) break;
                const x128 x = load128(xs + m * C + p * x128::size);
#pragma unroll
                for (int e = 0; e < x128::size; e++) acc[m] = fmaf(to_float(w[e]), to_float(x[e]), acc[m]);
            }
        }
    }
    // Reduce over the column's tpc threads: within each warp, then over its warps in order.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wpc = tpc / 32;
#pragma unroll
    for (int m = 0; m < MV_MAX_ROWS; m++) {
        if (m >= M) break;
        const float s = warp_sum(acc[m]);
        if (lane == 0) red[m][warp] = s;
    }
    __syncthreads();
    if (t == 0 && o < OC) {
        const float b = bias != nullptr ? to_float(bias[o]) : 0.0f;
        for (int m = 0; m < M; m++) {
            float v = b;
            for (int w = 0; w < wpc; w++) v += red[m][col * wpc + w];
            if (gelu) v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
            out[(long long)m * OC + o] = from_float<floatX>(v);
        }
    }
}

extern "C" __global__ void __launch_bounds__(MV_THREADS)
matvec_forward(floatX* __restrict__ out, const floatX* __restrict__ inp,
               const floatX* __restrict__ weight, const floatX* __restrict__ bias, int M, int C,
               int OC, int tpc, int gelu) {
    extern __shared__ __align__(16) unsigned char mv_smem[];
    floatX* xs = reinterpret_cast<floatX*>(mv_smem);
    for (int i = threadIdx.x; i < M * (C / x128::size); i += MV_THREADS)
        store128(xs + i * x128::size, load128(inp + (long long)i * x128::size));
    __syncthreads();
    matvec_rows(out, xs, weight, bias, M, C, OC, tpc, gelu);
}

extern "C" __global__ void __launch_bounds__(MV_THREADS)
matvec_layernorm_forward(floatX* __restrict__ out, floatX* __restrict__ residual,
                         const floatX* __restrict__ inp1, const floatX* __restrict__ inp2,
                         const floatX* __restrict__ ln_weight, const floatX* __restrict__ ln_bias,
                         const floatX* __restrict__ weight, const floatX* __restrict__ bias,
                         int M, int C, int OC, int tpc, int gelu, float eps) {
    extern __shared__ __align__(16) unsigned char mv_smem[];
    floatX* xs = reinterpret_cast<floatX*>(mv_smem);
    const int lane = threadIdx.x % 32, m = threadIdx.x / 32;
    if (m < M) {  // warp m: row m; a lane reads back only the packs it wrote
        floatX* row = xs + m * C;
        float sum = 0.0f;
        for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
            x128 x = load128(inp1 + (long long)m * C + c);
            if (inp2 != nullptr) {
                const x128 y = load128(inp2 + (long long)m * C + c);
#pragma unroll
                for (int k = 0; k < x128::size; k++) x[k] = from_float<floatX>(to_float(x[k]) + to_float(y[k]));
                if (blockIdx.x == 0) store128(residual + (long long)m * C + c, x);
            }
            store128(row + c, x);
#pragma unroll
            for (int k = 0; k < x128::size; k++) sum += to_float(x[k]);
        }
        const float mean = warp_sum(sum) / C;
        float var = 0.0f;
        for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
            const x128 x = load128(row + c);
#pragma unroll
            for (int k = 0; k < x128::size; k++) {
                const float d = to_float(x[k]) - mean;
                var += d * d;
            }
        }
        const float rs = rsqrtf(warp_sum(var) / C + eps);
        for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
            const x128 x = load128(row + c), w = load128(ln_weight + c), b = load128(ln_bias + c);
            x128 y;
#pragma unroll
            for (int k = 0; k < x128::size; k++)
                y[k] = from_float<floatX>((to_float(x[k]) - mean) * rs * to_float(w[k]) + to_float(b[k]));
            store128(row + c, y);
        }
    }
    __syncthreads();
    matvec_rows(out, xs, weight, bias, M, C, OC, tpc, gelu);
}
