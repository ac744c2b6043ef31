// Helpers shared by every kernel family: the compute type, 128-bit packed access, warp and
// block reductions, bf16 stochastic rounding. The loader folds this file into each .cu source
// before compiling, so a change here changes every module's cache key.
//
// floatX is the storage type of activations, parameters and gradients: __nv_bfloat16 when the
// module is compiled with -DLLMC_BF16, float otherwise. Arithmetic is always in float.
#pragma once
#include <cuda_bf16.h>
// No <stdint.h>: NVRTC has no C library headers, and a home-made uint32_t could clash with a
// header that does define it. Builtin types throughout: int/unsigned are 32-bit, long long 64.

#ifdef LLMC_BF16
typedef __nv_bfloat16 floatX;
#else
typedef float floatX;
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// 16 bytes of T moved as one load/store instruction (callers guarantee 16-byte alignment).
template <typename T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T v[size];
    __device__ __forceinline__ T& operator[](int i) { return v[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};
typedef Packed128<floatX> x128;
typedef Packed128<float> f128;

template <typename T>
__device__ __forceinline__ Packed128<T> load128(const T* p) {
    return *reinterpret_cast<const Packed128<T>*>(p);
}
// Streaming load: the data is read once, so keep it from evicting reused lines in L1/L2.
template <typename T>
__device__ __forceinline__ Packed128<T> load128cs(const T* p) {
    Packed128<T> r;
    int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
    *reinterpret_cast<int4*>(&r) = raw;
    return r;
}
template <typename T>
__device__ __forceinline__ void store128(T* p, const Packed128<T>& v) {
    *reinterpret_cast<Packed128<T>*>(p) = v;
}
template <typename T>
__device__ __forceinline__ void store128cs(T* p, const Packed128<T>& v) {
    __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
}

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
// Fixed order (warp tree, then warp 0 over the warp sums): deterministic run to run.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int nwarps = (blockDim.x + 31) / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int nwarps = (blockDim.x + 31) / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// A stateless hash (squirrel-noise style) giving 32 random bits per (position, seed):
// stochastic rounding needs independent bits per element without any RNG state in memory.
__device__ __forceinline__ unsigned int hash_u32(unsigned int pos, unsigned int seed) {
    const unsigned int B1 = 0x68E31DA4u, B2 = 0xB5297A4Du, B3 = 0x1B56C4E9u;
    unsigned int m = pos * B1;
    m += seed;
    m ^= (m >> 8);
    m += B2;
    m ^= (m << 8);
    m *= B3;
    m ^= (m >> 8);
    return m;
}

// float -> bf16, rounding up with probability equal to the dropped fraction: the expected
// value is exact, so tiny AdamW updates are not lost to round-to-nearest.
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float x, unsigned int bits) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return __float2bfloat16_rn(x);  // inf / nan
    u += (bits & 0xffffu);
    u &= 0xffff0000u;
    return __float2bfloat16_rz(__uint_as_float(u));
}

__device__ __forceinline__ void store_rounded(float* p, float x, unsigned int) { *p = x; }
__device__ __forceinline__ void store_rounded(__nv_bfloat16* p, float x, unsigned int bits) {
    *p = bf16_stochastic(x, bits);
}

// Column sums of a (G, M) fp32 matrix of per-block partials, in a fixed order: the deterministic
// second pass of a two-pass reduction. Block (32, by): column = blockIdx.x * 32 + threadIdx.x;
// thread row y sums rows y, y + by, y + 2 by, ... in order, then the by partial sums are added
// in y order through `scratch` (>= 32 * by floats). The result is valid in threads with
// threadIdx.y == 0 (others get 0). Columns >= M give 0.
__device__ __forceinline__ float column_sum_fixed_order(const float* part, int G, int M,
                                                        float* scratch) {
    const int col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (col < M) {
        #pragma unroll 8
        for (int g = threadIdx.y; g < G; g += blockDim.y) acc += part[(long long)g * M + col];
    }
    scratch[threadIdx.y * 32 + threadIdx.x] = acc;
    __syncthreads();
    float sum = 0.0f;
    if (threadIdx.y == 0) {
        for (int y = 0; y < blockDim.y; y++) sum += scratch[y * 32 + threadIdx.x];
    }
    return sum;
}
