// Tensor-core tile machinery of causal flash attention, shared by flash_attention.cu (forward)
// and flash_attention_bwd.cu (backward). Head size 64, bf16 storage, fp32 accumulation.
//
// Every product the kernels form is a 16-row warp strip held in registers (the mma A operand)
// times a 64-row bf16 tile in shared memory, used either transposed (the tile's rows are the
// product's n index, as K in S = Q K^T) or as stored (the tile's rows are its k index, as V in
// O = P V). Tiles arrive by cp.async (flash_attention_tiles.cuh: their swizzled format and every
// copy between them and global memory) and go to fragments by ldmatrix.
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
#pragma once
#include "flash_attention_tiles.cuh"

constexpr float FA_LOG2E = 1.4426950408889634f;
// softmax(s / 8) = 2^(s * FA_SCALE_LOG2 - m * FA_SCALE_LOG2) / sum: one FFMA per score
constexpr float FA_SCALE = 0.125f;  // 1 / sqrt(FA_HS)
constexpr float FA_SCALE_LOG2 = FA_SCALE * FA_LOG2E;

// ---- PTX wrappers ----
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
