/* Matmul bias gradient: the part of a linear layer that cuBLASLt does not do well
   (llmc/cublaslt.py does the products, the forward's bias and the fused GELU backward).

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
