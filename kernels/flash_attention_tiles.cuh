// The shared-memory tiles of causal flash attention and their copies to and from global
// memory, shared by every flash kernel (flash_attention.cuh and flash_attention_sm90.cuh build
// on them): cp.async loads of 64-row bf16 tiles (keys, values, queries, output gradients) with
// rows past the sequence zero-filled, 64-float rows (lse, D), and the 16-byte stores of a
// staged output tile.
//
// A row of 64 bf16 is 128 bytes = 8 chunks of 16 bytes; chunk c of row r is kept
// at chunk c ^ (r % 8), so the 8 rows that one ldmatrix matrix reads fall in 8 different bank
// groups, and so do the 8 rows a warp's fragment stores touch.
#pragma once
#include "common.cuh"

typedef __nv_bfloat16 bf16;

constexpr int FA_HS = 64;          // head size: one 128-byte tile row
constexpr int FA_TILE = 64;        // rows of a streamed tile: keys (forward, dq), queries (dk/dv)
constexpr int FA_TILE_BYTES = FA_TILE * FA_HS * 2;

extern __shared__ __align__(128) unsigned char fa_smem[];

__device__ __forceinline__ unsigned fa_smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---- cp.async (PTX) ----
// src_bytes = 0 zero-fills the destination: rows past T read as zeros, never as stale data
// (a masked score times a NaN from an unwritten V row would still be NaN).
__device__ __forceinline__ void fa_cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
// The same for a chunk known to be valid: no src-size operand.
__device__ __forceinline__ void fa_cp_async16_full(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void fa_cp_async4(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void fa_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
__device__ __forceinline__ void fa_cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
// ---- end of cp.async ----

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile.
__device__ __forceinline__ unsigned fa_offset(int row, int chunk) {
    return row * 128 + ((chunk ^ (row & 7)) << 4);
}

// A thread's part of every tile copy: chunk c = threadIdx.x % 8 of rows r0, r0 + STEP, ...
// (r0 = threadIdx.x / 8, STEP = NTHREADS / 8). With STEP a multiple of 8 every one of those rows
// has r0's swizzle, so in a whole tile the shared and global addresses just advance by fixed
// steps from the thread's first chunk: fa_my_chunk() is its offset in a shared tile,
// fa_my_row(src, stride) its source in a tile whose row 0 is at src.
__device__ __forceinline__ unsigned fa_my_chunk() {
    return fa_offset(threadIdx.x >> 3, threadIdx.x & 7);
}
__device__ __forceinline__ long long fa_my_elem(long long stride) {
    return (threadIdx.x >> 3) * stride + (threadIdx.x & 7) * 8;
}
__device__ __forceinline__ const bf16* fa_my_row(const bf16* src, long long stride) {
    return src + fa_my_elem(stride);
}

// Start copying a whole tile of ROWS rows: dst = tile + fa_my_chunk(), p = fa_my_row(tile's
// source row 0, stride). No index arithmetic or predicate per chunk. Loops over tiles keep p
// and step it a tile at a time.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void fa_load_rows(unsigned dst, const bf16* p, long long stride) {
    constexpr int STEP = NTHREADS / 8, CHUNKS = ROWS * 8 / NTHREADS;
    static_assert(STEP % 8 == 0 && (ROWS * 8) % NTHREADS == 0, "rows keep the thread's swizzle");
#pragma unroll
    for (int j = 0; j < CHUNKS; j++) {
        fa_cp_async16_full(dst + j * STEP * 128, p);
        p += STEP * stride;
    }
}

// Start copying ROWS rows of 64 bf16 (row r at src + r * stride) into the tile at `dst`; rows
// from `valid` on are zero-filled (their source address is clamped to row 0, never read). A
// whole tile (every tile but a sequence's last partial one) takes fa_load_rows where the
// thread count allows it.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void fa_load_tile(unsigned dst, const bf16* src,
                                             long long stride, int valid) {
    static_assert((ROWS * 8) % NTHREADS == 0, "whole chunks per thread");
    constexpr int STEP = NTHREADS / 8, CHUNKS = ROWS * 8 / NTHREADS;
    if constexpr (STEP % 8 == 0) {
        if (valid >= ROWS) {
            fa_load_rows<ROWS, NTHREADS>(dst + fa_my_chunk(), fa_my_row(src, stride), stride);
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < CHUNKS; j++) {
        const int i = threadIdx.x + j * NTHREADS;
        const int r = i >> 3, c = i & 7;
        const bool ok = r < valid;
        fa_cp_async16(dst + fa_offset(r, c), src + (ok ? r : 0) * stride + c * 8, ok);
    }
}

// Start copying K and V rows [first, first + ROWS) of a head (k and v: its row 0; rows from
// `end` on zero-filled) into the tiles at sK and sV: every kernel's key/value stream.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void fa_load_kv(unsigned sK, unsigned sV, const bf16* k, const bf16* v,
                                           int first, long long stride, int end) {
    fa_load_tile<ROWS, NTHREADS>(sK, k + first * stride, stride, end - first);
    fa_load_tile<ROWS, NTHREADS>(sV, v + first * stride, stride, end - first);
}

// fa_load_kv in a loop over key tiles: `mine` is this thread's fa_my_row of tile `first`'s K row
// (its V is C elements on), stepped here to the next tile; `chunk` is fa_my_chunk(). Whole
// tiles load from it; the last partial one takes fa_load_kv.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void fa_load_kv_step(unsigned sK, unsigned sV, const bf16*& mine,
                                                unsigned chunk, int C, const bf16* k,
                                                const bf16* v, int first, long long stride,
                                                int end) {
    if (end - first >= ROWS) {
        fa_load_rows<ROWS, NTHREADS>(sK + chunk, mine, stride);
        fa_load_rows<ROWS, NTHREADS>(sV + chunk, mine + C, stride);
    } else {
        fa_load_kv<ROWS, NTHREADS>(sK, sV, k, v, first, stride, end);
    }
    mine += ROWS * stride;
}

// Start copying 64 floats (src[0..valid), zeros after) into `dst`; threads 0..63 take one each.
__device__ __forceinline__ void fa_load_row64(unsigned dst, const float* src, int valid) {
    const int i = threadIdx.x;
    if (i < FA_TILE) fa_cp_async4(dst + 4 * i, src + (i < valid ? i : 0), i < valid);
}
// The same, with `fill` (a plain shared store, visible after the next barrier) from `valid` on.
__device__ __forceinline__ void fa_load_row64_fill(unsigned dst, const float* src, int valid,
                                                   float fill) {
    const int i = threadIdx.x;
    if (i < FA_TILE && i < valid) fa_cp_async4(dst + 4 * i, src + i, true);
    else if (i < FA_TILE) asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(dst + 4 * i), "f"(fill));
}

// Copy the first `valid` rows of a tile to global rows dst + r * stride, 16 bytes a thread
// (the chunks fa_load_tile would load: a whole tile steps fixed addresses, as fa_load_rows).
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void fa_store_tile(bf16* dst, long long stride, int valid,
                                              const unsigned char* tile) {
    static_assert((ROWS * 8) % NTHREADS == 0, "whole chunks per thread");
    constexpr int STEP = NTHREADS / 8, CHUNKS = ROWS * 8 / NTHREADS;
    if constexpr (STEP % 8 == 0) {
        if (valid >= ROWS) {
            const unsigned char* src = tile + fa_my_chunk();
            bf16* p = dst + fa_my_elem(stride);
#pragma unroll
            for (int j = 0; j < CHUNKS; j++) {
                *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(src + j * STEP * 128);
                p += STEP * stride;
            }
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < CHUNKS; j++) {
        const int i = threadIdx.x + j * NTHREADS;
        const int r = i >> 3, c = i & 7;
        if (r < valid)
            *reinterpret_cast<int4*>(dst + r * stride + c * 8) =
                *reinterpret_cast<const int4*>(tile + fa_offset(r, c));
    }
}
