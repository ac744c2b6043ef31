// Tensor-core tile machinery of causal flash attention, shared by flash_attention.cu (forward)
// and flash_attention_bwd.cu (backward). Head size 64, bf16 storage, fp32 accumulation.
//
// Every product the kernels form is a 16-row warp strip held in registers (the mma A operand)
// times a 64-row bf16 tile in shared memory, used either transposed (the tile's rows are the
// product's n index, as K in S = Q K^T) or as stored (the tile's rows are its k index, as V in
// O = P V). Tiles arrive by cp.async and go to fragments by ldmatrix.
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA), for lane l,
// g = l / 4, t = l % 4; a 32-bit register holds two bf16, the lower column in the low half:
//   A 16x16:  a0 = A[g][2t..2t+1]  a1 = A[g+8][2t..2t+1]  a2 = A[g][2t+8..]  a3 = A[g+8][2t+8..]
//   B 16x8:   b0 = B[2t..2t+1][g]  b1 = B[2t+8..2t+9][g]
//   C 16x8:   c0, c1 = C[g][2t..2t+1]  c2, c3 = C[g+8][2t..2t+1]
// So the C fragments of n-tiles 2j and 2j+1, packed to bf16, are exactly the A fragment of
// k-chunk j of the next product: P and dS go from one mma to the next without leaving registers.
// ldmatrix.x4: lanes 8i..8i+7 address the 8 rows of 8x8 matrix i; register i of lane l receives
// row l/4, columns 2t..2t+1 of matrix i (with .trans: rows 2t..2t+1 of column l/4).
//
// Shared tiles: a row of 64 bf16 is 128 bytes = 8 chunks of 16 bytes; chunk c of row r is kept
// at chunk c ^ (r % 8), so the 8 rows that one ldmatrix matrix reads fall in 8 different bank
// groups, and so do the 8 rows a warp's fragment stores touch.
#pragma once
#include "common.cuh"

typedef __nv_bfloat16 bf16;

constexpr int FA_HS = 64;          // head size: one 128-byte tile row
constexpr int FA_TILE = 64;        // rows of a streamed tile: keys (forward, dq), queries (dk/dv)
constexpr int FA_TILE_BYTES = FA_TILE * FA_HS * 2;
constexpr float FA_LOG2E = 1.4426950408889634f;
// softmax(s / 8) = 2^(s * FA_SCALE_LOG2 - m * FA_SCALE_LOG2) / sum: one FFMA per score
constexpr float FA_SCALE = 0.125f;  // 1 / sqrt(FA_HS)
constexpr float FA_SCALE_LOG2 = FA_SCALE * FA_LOG2E;

extern __shared__ __align__(128) unsigned char fa_smem[];

// ---- PTX wrappers ----
__device__ __forceinline__ unsigned fa_smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
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
__device__ __forceinline__ void fa_ldmatrix_x4(unsigned r[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void fa_ldmatrix_x4_trans(unsigned r[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// c += a * b on one 16x8x16 tile
__device__ __forceinline__ void fa_mma(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 2^x in one MUFU op (exp2f would add range fix-ups); 2^-inf = +0 gives masked scores P = 0.
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// ---- end of PTX wrappers ----

__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) is the low half
    return *reinterpret_cast<unsigned*>(&v);
}

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

// The ldmatrix addresses below are (tile + lane offset) ^ (k-chunk << 5) + 2048 * (16-row
// group): one XOR and an immediate per load. Valid because every lane row is a multiple of 8
// plus lane & 7, so chunk 2kc + x lands at (2kc + x) ^ (lane & 7) = 2kc ^ (x ^ (lane & 7)).

// A fragments of tile rows [r0, r0 + 16), all four 16-column k-chunks: a[kc][0..3].
__device__ __forceinline__ void fa_load_a(unsigned a[4][4], unsigned tile, int r0, int lane) {
    const unsigned off = fa_offset(r0 + (lane & 15), lane >> 4);
#pragma unroll
    for (int kc = 0; kc < 4; kc++) fa_ldmatrix_x4(a[kc], tile + (off ^ (kc << 5)));
}

// acc (16 x 64) += A (16 x 64, fragments a) * tile^T: the tile's 64 rows are the n index.
// Matrices of one ldmatrix: (rows +0..7, chunk 2kc), (+0..7, 2kc+1), (+8..15, 2kc), (+8..15,
// 2kc+1) = b0, b1 of n-tile 2p, then b0, b1 of n-tile 2p+1.
__device__ __forceinline__ void fa_mma_tile_t(float acc[8][4], const unsigned a[4][4],
                                              unsigned tile, int lane) {
    const unsigned off = fa_offset(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
        const unsigned base = tile + (off ^ (kc << 5));
#pragma unroll
        for (int p = 0; p < 4; p++) {
            unsigned b[4];
            fa_ldmatrix_x4(b, base + p * 2048);
            fa_mma(acc[2 * p], a[kc], b[0], b[1]);
            fa_mma(acc[2 * p + 1], a[kc], b[2], b[3]);
        }
    }
}

// acc (16 x 64) += A (16 x 64, fragments a) * tile: the tile's 64 rows are the k index.
// Matrices of one ldmatrix.trans: (rows +0..7, chunk 2p), (+8..15, 2p), (+0..7, 2p+1), (+8..15,
// 2p+1) = b0, b1 of n-tile 2p, then b0, b1 of n-tile 2p+1.
__device__ __forceinline__ void fa_mma_tile(float acc[8][4], const unsigned a[4][4],
                                            unsigned tile, int lane) {
    const unsigned off = fa_offset((((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4);
#pragma unroll
    for (int p = 0; p < 4; p++) {
        const unsigned base = tile + (off ^ (p << 5));
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned b[4];
            fa_ldmatrix_x4_trans(b, base + kk * 2048);
            fa_mma(acc[2 * p], a[kk], b[0], b[1]);
            fa_mma(acc[2 * p + 1], a[kk], b[2], b[3]);
        }
    }
}

// The C fragments of a 16 x 16K strip, rounded to bf16, as the A fragments of the next product
// (k16 slice kk from column groups 2kk and 2kk + 1).
template <int K>
__device__ __forceinline__ void fa_c_to_a(unsigned (&a)[K][4], const float (&c)[2 * K][4]) {
#pragma unroll
    for (int kk = 0; kk < K; kk++) {
        a[kk][0] = fa_pack(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = fa_pack(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = fa_pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = fa_pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// The forwards' causal mask on a tile of scores that crosses the diagonal (accumulator layout:
// s[n][e] is row r + 8 (e >> 1), column 8n + 2t + (e & 1) of the tile): the key of tile column
// 8n + (e & 1) (a constant) + 2t follows the row when that column exceeds lim + 8 (e >> 1), with
// lim = row0 + g - k0 - 2t for the thread's first row row0 + g and the tile's first key k0.
// Column groups below N0 precede every row (the caller knows): not tested.
template <int NS, int N0 = 0>
__device__ __forceinline__ void fa_mask_scores(float (&s)[NS][4], int lim) {
#pragma unroll
    for (int n = N0; n < NS; n++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (8 * n + (e & 1) > lim + 8 * (e >> 1)) s[n][e] = NEG_INF;
}

// The forwards' online softmax over one tile of scores s (NS column groups of the thread's two
// rows): the running max m grows to the tile's (shared by the row's 4 lanes), s becomes
// P = 2^(s * FA_SCALE_LOG2 - m * FA_SCALE_LOG2), and O and this lane's share l of the row sum
// are rescaled to the new max before P's sum is added (corr = 0 on the first tile).
template <int NS>
__device__ __forceinline__ void fa_softmax_tile(float (&s)[NS][4], float (&m)[2], float (&l)[2],
                                                float (&o)[8][4]) {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float mx = m[hh];
#pragma unroll
        for (int n = 0; n < NS; n++) mx = fmaxf(mx, fmaxf(s[n][2 * hh], s[n][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mc = mx * FA_SCALE_LOG2;
        const float corr = fa_exp2(m[hh] * FA_SCALE_LOG2 - mc);
        m[hh] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < NS; n++) {
#pragma unroll
            for (int e = 2 * hh; e < 2 * hh + 2; e++) {
                s[n][e] = fa_exp2(fmaf(s[n][e], FA_SCALE_LOG2, -mc));
                sum += s[n][e];
            }
        }
#pragma unroll
        for (int n = 0; n < 8; n++) {
            o[n][2 * hh] *= corr;
            o[n][2 * hh + 1] *= corr;
        }
        l[hh] = l[hh] * corr + sum;
    }
}

// Write C (a 16 x 64 strip at tile rows r0..r0+15) as bf16 into a swizzled tile, scaled per row
// of the thread's pair: scale[h] for row r0 + g + 8h.
__device__ __forceinline__ void fa_stage_rows(unsigned char* tile, const float c[8][4],
                                              const float scale[2], int r0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = r0 + g + 8 * h;
            *reinterpret_cast<unsigned*>(tile + fa_offset(row, n) + 4 * t) =
                fa_pack(c[n][2 * h] * scale[h], c[n][2 * h + 1] * scale[h]);
        }
    }
}
// The same with one scale for the whole strip.
__device__ __forceinline__ void fa_stage(unsigned char* tile, const float c[8][4], float scale,
                                         int r0, int lane) {
    const float both[2] = {scale, scale};
    fa_stage_rows(tile, c, both, r0, lane);
}

// The grid is (NH, tiles per head, B): block (h, rank, b) takes head h of batch b and tile
// `rank`, rank 0 the tile with the most work. Blocks start in index order (x fastest), so the
// blocks in flight share the K/V (or Q/dO) of a few heads of one batch, which stay in L2, and
// within them the long blocks start first so the short ones fill the tail. No division: the
// coordinates are the block's own.
struct FaTile {
    int b, h, bh, lo, hi;  // bh = b * NH + h
};

// Query tiles, rank 0 the last one (its rows see the most keys, so it starts first).
__device__ __forceinline__ FaTile fa_query_tile(int rows, int T, int NH) {
    const int n = (T + rows - 1) / rows;
    const int lo = (n - 1 - (int)blockIdx.y) * rows;
    return FaTile{(int)blockIdx.z, (int)blockIdx.x, (int)(blockIdx.z * NH + blockIdx.x), lo,
                  min(lo + rows, T)};
}

// Key tiles, rank 0 the first one (every query sees its keys).
__device__ __forceinline__ FaTile fa_key_tile(int rows, int T, int NH) {
    const int lo = blockIdx.y * rows;
    return FaTile{(int)blockIdx.z, (int)blockIdx.x, (int)(blockIdx.z * NH + blockIdx.x), lo,
                  min(lo + rows, T)};
}

// Head h of batch b in the (B, T, 3, NH, HS) qkv rows, as every kernel's set-up needs it: its
// batch and head, C = NH * HS, the row stride 3C of qkv (and dqkv), and row 0 of its q, k and v
// columns.
struct FaHead {
    int b, h, C;
    long long stride;
    const bf16* q;
    const bf16* k;
    const bf16* v;
};

__device__ __forceinline__ FaHead fa_head(const bf16* qkv, const FaTile& tile, int T, int NH) {
    FaHead hd;
    hd.b = tile.b;
    hd.h = tile.h;
    hd.C = NH * FA_HS;
    hd.stride = 3LL * hd.C;
    hd.q = qkv + (long long)hd.b * T * hd.stride + hd.h * FA_HS;
    hd.k = hd.q + hd.C;
    hd.v = hd.q + 2 * hd.C;
    return hd;
}

// The backward's D = rowsum(dO * O) for a block's BR query rows from q0, read straight from
// global memory (both kernels of each backward call it while their first tiles load): 8 lanes a
// row, 16 bytes each, a fixed shuffle tree, so the same bits everywhere. Rows past T get 0.
// dout_rows / out_rows point at row 0 of this (batch, head); D_head at D[b, h, 0]; sD (BR floats)
// receives every row's value, D_head only the rows < T.
template <int BR, int NT>
__device__ __forceinline__ void fa_rowdot_D(float* sD, float* __restrict__ D_head,
                                            const bf16* __restrict__ dout_rows,
                                            const bf16* __restrict__ out_rows, int C, int q0,
                                            int T) {
    constexpr int NJ = BR * 8 / NT;  // rows a thread's lane group covers
    int4 a[NJ], o[NJ];  // every load in flight before the first is used (rows past T: zero)
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const int r = (threadIdx.x + j * NT) >> 3, c = threadIdx.x & 7;
        a[j] = o[j] = make_int4(0, 0, 0, 0);
        if (q0 + r < T) {
            a[j] = *reinterpret_cast<const int4*>(dout_rows + (long long)r * C + c * 8);
            o[j] = *reinterpret_cast<const int4*>(out_rows + (long long)r * C + c * 8);
        }
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const int r = (threadIdx.x + j * NT) >> 3, c = threadIdx.x & 7;
        const bf16* av = reinterpret_cast<const bf16*>(&a[j]);
        const bf16* ov = reinterpret_cast<const bf16*>(&o[j]);
        float d = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) d = fmaf(to_float(av[k]), to_float(ov[k]), d);
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        d += __shfl_xor_sync(0xffffffffu, d, 4);
        if (c == 0) {
            sD[r] = d;
            if (q0 + r < T) D_head[q0 + r] = d;
        }
    }
}
