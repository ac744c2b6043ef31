/* fp8 casts with per-tensor scales, and the scale bookkeeping (delayed scaling).

   cast:      q = fp8(x * scale)  rounded to nearest even, saturating (satfinite: +-448 for E4M3,
              +-57344 for E5M2; NaN stays NaN); amax = max(amax, max |x|) over the tensor
   gelu cast: the same of y = gelu(x) rounded to floatX (y optionally stored as floatX too)
   update:    history[s, pos] = amax[s]; amax[s] = 0;
              m = max of the finite entries of history[s, :];
              scale[s] = fmax[s] / m * 2^-margin when m > 0 and that is finite and > 0, else kept;
              scale_inv[s] = 1 / scale[s] (the decode scale cuBLASLt multiplies the product by)

   Shapes: inp (Z, R, C) floatX; out (Z, R, C) and out_t (Z, C, R) fp8 bytes (either may be
   NULL: amax alone); amax, scale (Z,) fp32 (Z = 1 for activations, L for a stacked weight);
   history (S, H) fp32, amax/scale/scale_inv/fmax (S,) fp32. R and C multiples of 8.
   Nothing is saved for a backward; these are the casts in front of the fp8 products.

   Work split of the casts: one block per 64 x 64 tile of one matrix (blockIdx.z), 256 threads;
   a thread reads 8 consecutive elements of a row (one 128-bit load of bf16), writes their 8
   fp8 bytes to `out` and to a shared tile, and after a sync writes 8 consecutive bytes of a
   column of the tile to `out_t`. amax is a max over the bits of |x| (for x >= 0 the IEEE order
   is the integer order, and a NaN's bits are above +inf's, so a NaN anywhere shows up as NaN):
   a block max, then one atomicMax per block.

   fp8 conversion is cuda_fp8.h's: the cvt.rn.satfinite instruction on sm_89+, the same rounding
   in software below (the kernels compile for sm_80; the fp8 products themselves need sm_89+).
*/
#include "common.cuh"
#include "gelu.cuh"
#include <cuda_fp8.h>

#define FP8_TILE 64

__device__ __forceinline__ unsigned short fp8x2(float a, float b, int e5m2) {
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, e5m2 ? __NV_E5M2 : __NV_E4M3);
}

// Byte offset of tile element (row, col) in the shared tile: 4-byte word col / 4 of a row is
// stored at word (col / 4) ^ (2 * ((row / 8) % 8)). The XOR keeps a thread's 8-byte row piece
// (an even word and the next) together and in order, and spreads the transposed reads (8 rows
// 8 apart, one column) over distinct banks.
__device__ __forceinline__ int fp8_tile_offset(int row, int col) {
    return row * (FP8_TILE + 8) + ((((col >> 2) ^ (2 * ((row >> 3) & 7)))) << 2) + (col & 3);
}

template <bool GELU>
__device__ __forceinline__ void cast_transpose_tile(floatX* __restrict__ out_x,
                                                    unsigned char* __restrict__ out,
                                                    unsigned char* __restrict__ out_t,
                                                    float* amax, const floatX* __restrict__ inp,
                                                    const float* scale, int rows, int cols,
                                                    int e5m2) {
    constexpr int ITER = FP8_TILE / 32, LOADS = 8 / x128::size;
    __shared__ __align__(16) unsigned char tile[FP8_TILE * (FP8_TILE + 8)];
    __shared__ unsigned int block_amax[8];
    const long long z_off = (long long)blockIdx.z * rows * cols;
    const float s = scale[blockIdx.z];
    const int r0 = blockIdx.y * FP8_TILE, c0 = blockIdx.x * FP8_TILE;
    const int gx = threadIdx.x % 8, gy = threadIdx.x / 8;  // column group of 8, row 0..31
    // every row this thread converts is loaded before the first is used (more loads in flight)
    x128 p[ITER][LOADS];
    #pragma unroll
    for (int it = 0; it < ITER; it++) {
        const int r = r0 + gy + 32 * it, c = c0 + gx * 8;
        if (r < rows && c < cols) {
            #pragma unroll
            for (int k = 0; k < LOADS; k++)
                p[it][k] = load128(inp + z_off + (long long)r * cols + c + k * x128::size);
        }
    }
    unsigned int m = 0;
    #pragma unroll
    for (int it = 0; it < ITER; it++) {
        const int r = r0 + gy + 32 * it, c = c0 + gx * 8;
        if (r >= rows || c >= cols) continue;
        const long long idx = z_off + (long long)r * cols + c;
        float v[8];
        #pragma unroll
        for (int k = 0; k < LOADS; k++) {
            #pragma unroll
            for (int j = 0; j < x128::size; j++) {
                float x = to_float(p[it][k][j]);
                if (GELU) {
                    p[it][k][j] = from_float<floatX>(gelu_fwd(x));
                    x = to_float(p[it][k][j]);  // cast what a floatX gelu output would hold
                }
                v[k * x128::size + j] = x;
            }
            if (GELU && out_x != nullptr) store128(out_x + idx + k * x128::size, p[it][k]);
        }
        unsigned int q[2] = {0u, 0u};
        #pragma unroll
        for (int k = 0; k < 8; k += 2) {
            m = max(m, max(__float_as_uint(fabsf(v[k])), __float_as_uint(fabsf(v[k + 1]))));
            const unsigned int pair = fp8x2(v[k] * s, v[k + 1] * s, e5m2);
            q[k / 4] |= pair << (8 * (k % 4));
        }
        const uint2 packed = make_uint2(q[0], q[1]);
        if (out != nullptr) *reinterpret_cast<uint2*>(out + idx) = packed;
        *reinterpret_cast<uint2*>(tile + fp8_tile_offset(gy + 32 * it, gx * 8)) = packed;
    }
    m = __reduce_max_sync(0xffffffffu, m);
    if (threadIdx.x % 32 == 0) block_amax[threadIdx.x / 32] = m;
    __syncthreads();  // also publishes the tile
    if (threadIdx.x == 0) {
        unsigned int b = 0;
        for (int w = 0; w < blockDim.x / 32; w++) b = max(b, block_amax[w]);
        atomicMax(reinterpret_cast<unsigned int*>(amax + blockIdx.z), b);
    }
    if (out_t == nullptr) return;
    // out_t row c (a column of the tile), bytes r0 + 8 gx .. + 8
    #pragma unroll
    for (int it = 0; it < ITER; it++) {
        const int c = c0 + gy + 32 * it, r = r0 + gx * 8;
        if (c >= cols || r >= rows) continue;
        unsigned int q[2] = {0u, 0u};
        #pragma unroll
        for (int k = 0; k < 8; k++)
            q[k / 4] |= (unsigned int)tile[fp8_tile_offset(gx * 8 + k, gy + 32 * it)]
                        << (8 * (k % 4));
        *reinterpret_cast<uint2*>(out_t + z_off + (long long)c * rows + r) = make_uint2(q[0], q[1]);
    }
}

// Grid (ceil(C / 64), ceil(R / 64), Z), block 256.
extern "C" __global__ void __launch_bounds__(256) fp8_cast_transpose(
        unsigned char* out, unsigned char* out_t, float* amax, const floatX* inp,
        const float* scale, int rows, int cols, int e5m2) {
    cast_transpose_tile<false>(nullptr, out, out_t, amax, inp, scale, rows, cols, e5m2);
}

// The MLP's GELU with its output cast: inp is the fc output (pre-activation); out_x (may be
// NULL) receives gelu(inp) as floatX. Same geometry as fp8_cast_transpose.
extern "C" __global__ void __launch_bounds__(256) fp8_gelu_cast_transpose(
        floatX* out_x, unsigned char* out, unsigned char* out_t, float* amax, const floatX* inp,
        const float* scale, int rows, int cols, int e5m2) {
    cast_transpose_tile<true>(out_x, out, out_t, amax, inp, scale, rows, cols, e5m2);
}

// One block strides over the S slots. pos (int32 device scalar) is the history column this
// update writes; with advance = 1 it moves on to (pos + 1) % H once every slot has used it, so
// a captured step replays correctly (a host counter would be frozen into the graph).
// scale_inv has a 16-byte row per slot (inv_stride floats): cuBLASLt reads each decode scale
// through its own pointer and refuses pointers that are not 16-byte aligned.
extern "C" __global__ void fp8_scale_update(float* scale, float* scale_inv, float* history,
                                            float* amax, const float* fmax, int* pos, int S,
                                            int H, int inv_stride, float margin_scale,
                                            int advance) {
    const int p = *pos;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        float* h = history + (long long)s * H;
        h[p] = amax[s];
        amax[s] = 0.0f;
        float m = 0.0f;
        for (int i = 0; i < H; i++) {
            if (isfinite(h[i])) m = fmaxf(m, h[i]);
        }
        float sc = scale[s];
        if (m > 0.0f) {
            const float candidate = fmax[s] / m * margin_scale;
            if (isfinite(candidate) && candidate > 0.0f) sc = candidate;
        }
        scale[s] = sc;
        scale_inv[(long long)s * inv_stride] = 1.0f / sc;
    }
    __syncthreads();  // every thread has read *pos
    if (advance && threadIdx.x == 0) *pos = (p + 1) % H;
}
