// Causal flash attention, backward (the forward and the tile machinery: flash_attention.cu,
// flash_attention.cuh). Head size 64, bf16 in and out, fp32 accumulation on tensor cores.
//
// With P = exp(S - lse), S = q . k / 8 (the forward's probabilities, rebuilt from its lse):
//   D[t]   = sum_d dout[t, d] out[t, d]                  (= sum_u P[t, u] dP[t, u])
//   dP     = dout v^T,   dS = P * (dP - D)
//   dq     = dS k / 8,   dk = dS^T q / 8,   dv = P^T dout
// dqkv (B, T, 3C) bf16 `=` (dq, dk, dv where q, k, v sit in qkv); dout, out (B, T, C) bf16;
// lse (B, NH, T) f32 from the forward; D (B, NH, T) f32 scratch, written by the first kernel.
//
// Deterministic without atomics: two kernels, each the only writer of what it computes.
//  1. flash_attention_backward_dq: one block per 16 * NW query rows, looping over key tiles
//     (as the forward): D for its rows, then dS, and dq in registers.
//  2. flash_attention_backward_dkdv: one block per 16 * NW keys, looping over 64-query tiles of
//     Q, dout, lse and D: dk and dv in registers.
// S and P are computed in both (7 tile products per tile pair instead of 5): the price of no
// float atomics and no fp32 dq buffer. A warp's own strips (Q and dout, or K and V) stay in
// shared memory and are re-read as A fragments every tile (registers are the scarcer resource);
// P and dS are repacked to A fragments in registers (see flash_attention.cuh). Rows and keys
// past T are zero-filled in shared memory and masked.
// NW = 4 warps per block (8 measured slower on an H100: backward 1.875 vs 1.487 ms at B=64,
// NH=12, T=1024). Registers (ptxas 12.9, no spills): 168, so 3 blocks (12 warps) fit an SM.
#include "flash_attention.cuh"

template <int NW>
__device__ __forceinline__ void flash_backward_dq(
        bf16* __restrict__ dqkv, float* __restrict__ D, const bf16* __restrict__ dout,
        const bf16* __restrict__ qkv, const bf16* __restrict__ out,
        const float* __restrict__ lse, int B, int T, int NH) {
    constexpr int BR = 16 * NW, NT = 32 * NW;
    const FaTile tile = fa_query_tile(BR, T, NH);
    const int bh = tile.bh, q0 = tile.lo, q_end = tile.hi;
    const FaHead hd = fa_head(qkv, tile, T, NH);
    const int b = hd.b, h = hd.h, C = hd.C;
    const int n_kt = (q_end + FA_TILE - 1) / FA_TILE;

    const long long stride = hd.stride;
    const bf16 *q_src = hd.q, *k_src = hd.k, *v_src = hd.v;
    const long long row_do = ((long long)b * T + q0) * C + h * FA_HS;  // row q0 of dout and out

    // shared: Q (BR rows; reused to stage dq), dO (BR), K[2], V[2] (64 rows each), D (BR floats)
    const unsigned sQ = fa_smem_u32(fa_smem);
    const unsigned sdO = sQ + BR * 128, sK = sdO + BR * 128, sV = sK + 2 * FA_TILE_BYTES;
    float* sD = reinterpret_cast<float*>(fa_smem + 2 * BR * 128 + 4 * FA_TILE_BYTES);

    fa_load_tile<BR, NT>(sQ, q_src + q0 * stride, stride, q_end - q0);
    fa_load_tile<BR, NT>(sdO, dout + row_do, C, q_end - q0);
    fa_load_kv<FA_TILE, NT>(sK, sV, k_src, v_src, 0, stride, T);
    fa_cp_async_commit();

    // D for the block's rows straight from global while the tiles load
    fa_rowdot_D<BR, NT>(sD, D + (long long)bh * T, dout + row_do, out + row_do, C, q0, T);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = q0 + 16 * warp;
    const bool active = row0 < T;
    float lse2[2], dd[2];  // lse in log2 units and D for rows g and g + 8 of the strip
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int row = row0 + g + 8 * hh;
        lse2[hh] = row < T ? lse[(long long)bh * T + row] * FA_LOG2E : 0.0f;
    }
    float dq[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    for (int j = 0; j < n_kt; j++) {
        fa_cp_async_wait_all();
        __syncthreads();  // tile j and sD visible to all; tile j - 1's buffers free
        if (j + 1 < n_kt) {
            const int k1 = (j + 1) * FA_TILE, buf = (j + 1) & 1;
            const unsigned off = buf * FA_TILE_BYTES;
            fa_load_kv<FA_TILE, NT>(sK + off, sV + off, k_src, v_src, k1, stride, T);
            fa_cp_async_commit();
        }
        if (j == 0) {
            dd[0] = sD[16 * warp + g];
            dd[1] = sD[16 * warp + g + 8];
        }
        const int k0 = j * FA_TILE;
        if (!active || k0 > row0 + 15) continue;  // every key of the tile follows every row
        const unsigned tK = sK + (j & 1) * FA_TILE_BYTES, tV = sV + (j & 1) * FA_TILE_BYTES;

        float s[8][4], dp[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
        }
        unsigned af[4][4];  // this warp's Q, then dO strip (re-read each tile: registers are dear)
        fa_load_a(af, sQ, 16 * warp, lane);
        fa_mma_tile_t(s, af, tK, lane);
        fa_load_a(af, sdO, 16 * warp, lane);
        fa_mma_tile_t(dp, af, tV, lane);
        if (k0 + FA_TILE - 1 > row0) {  // the tile crosses this warp's diagonal
            // key k0 + 8n + 2t + (e & 1) follows query row0 + g + 8 (e >> 1) when the tile
            // column 8n + (e & 1) (a constant) exceeds lim + 8 (e >> 1)
            const int lim = row0 + g - k0 - 2 * t;
#pragma unroll
            for (int n = 0; n < 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float p = 8 * n + (e & 1) > lim + 8 * (e >> 1)
                                        ? 0.0f
                                        : fa_exp2(fmaf(s[n][e], FA_SCALE_LOG2, -lse2[e >> 1]));
                    s[n][e] = p * (dp[n][e] - dd[e >> 1]);  // dS
                }
            }
        } else {
#pragma unroll
            for (int n = 0; n < 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float p = fa_exp2(fmaf(s[n][e], FA_SCALE_LOG2, -lse2[e >> 1]));
                    s[n][e] = p * (dp[n][e] - dd[e >> 1]);  // dS
                }
            }
        }
        unsigned dsf[4][4];
        fa_c_to_a(dsf, s);
        fa_mma_tile(dq, dsf, tK, lane);
    }

    __syncwarp();  // this warp's Q rows are read (fragments) before they are overwritten
    fa_stage(fa_smem, dq, FA_SCALE, 16 * warp, lane);
    __syncthreads();
    fa_store_tile<BR, NT>(dqkv + ((long long)b * T + q0) * stride + h * FA_HS, stride, q_end - q0,
                          fa_smem);
}

template <int NW>
__device__ __forceinline__ void flash_backward_dkdv(
        bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
        const bf16* __restrict__ qkv, const float* __restrict__ lse,
        const float* __restrict__ D, int B, int T, int NH) {
    constexpr int BC = 16 * NW, NT = 32 * NW;
    const FaTile tile = fa_key_tile(BC, T, NH);
    const int bh = tile.bh, k0 = tile.lo, k_end = tile.hi;
    const FaHead hd = fa_head(qkv, tile, T, NH);
    const int b = hd.b, h = hd.h, C = hd.C;
    const int n_qt = (T - k0 + FA_TILE - 1) / FA_TILE;  // query tiles from k0 (earlier: all masked)

    const long long stride = hd.stride;
    const bf16 *q_src = hd.q, *k_src = hd.k, *v_src = hd.v;
    const bf16* do_src = dout + (long long)b * T * C + h * FA_HS;
    const float* lse_src = lse + (long long)bh * T;
    const float* d_src = D + (long long)bh * T;

    // shared: K, V (BC rows each; reused to stage dk, dv), Q[2], dO[2] (64 rows), lse[2], D[2]
    const unsigned sK = fa_smem_u32(fa_smem);
    const unsigned sV = sK + BC * 128, sQ = sV + BC * 128, sdO = sQ + 2 * FA_TILE_BYTES;
    const unsigned sL = sdO + 2 * FA_TILE_BYTES, sDD = sL + 2 * FA_TILE * 4;
    const float* fL = reinterpret_cast<const float*>(fa_smem + (sL - sK));
    const float* fD = reinterpret_cast<const float*>(fa_smem + (sDD - sK));

    fa_load_kv<BC, NT>(sK, sV, k_src, v_src, k0, stride, k_end);
    fa_load_tile<FA_TILE, NT>(sQ, q_src + k0 * stride, stride, T - k0);
    fa_load_tile<FA_TILE, NT>(sdO, do_src + (long long)k0 * C, C, T - k0);
    fa_load_row64(sL, lse_src + k0, T - k0);
    fa_load_row64(sDD, d_src + k0, T - k0);
    fa_cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int key0 = k0 + 16 * warp;  // this warp's keys: key0 .. key0 + 15
    const bool active = key0 < T;
    float dk[8][4], dv[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }

    for (int j = 0; j < n_qt; j++) {
        fa_cp_async_wait_all();
        __syncthreads();  // query tile j visible to all; tile j - 1's buffers free
        if (j + 1 < n_qt) {
            const int q1 = k0 + (j + 1) * FA_TILE, buf = (j + 1) & 1;
            const unsigned off = buf * FA_TILE_BYTES;
            fa_load_tile<FA_TILE, NT>(sQ + off, q_src + q1 * stride, stride, T - q1);
            fa_load_tile<FA_TILE, NT>(sdO + off, do_src + (long long)q1 * C, C, T - q1);
            fa_load_row64(sL + buf * FA_TILE * 4, lse_src + q1, T - q1);
            fa_load_row64(sDD + buf * FA_TILE * 4, d_src + q1, T - q1);
            fa_cp_async_commit();
        }
        const int qs = k0 + j * FA_TILE;  // first query of the tile
        if (!active || qs + FA_TILE - 1 < key0) continue;  // every query precedes every key
        const int buf = j & 1;
        const unsigned tQ = sQ + buf * FA_TILE_BYTES, tdO = sdO + buf * FA_TILE_BYTES;
        const float* tL = fL + buf * FA_TILE;
        const float* tD = fD + buf * FA_TILE;

        // transposed scores: rows = this warp's keys (g, g + 8), columns = queries 8n + 2t (+1)
        float st[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.0f;
        unsigned af[4][4];  // this warp's K, then V strip (re-read each tile: registers are dear)
        fa_load_a(af, sK, 16 * warp, lane);
        fa_mma_tile_t(st, af, tQ, lane);
        // Masked: a key after the query, or a query past T (its zero row would give P = 1).
        // Query qs + 8n + 2t + (e & 1) is tile column c = 8n + (e & 1) (a constant): before key
        // key0 + g + 8 (e >> 1) when c < klim + 8 (e >> 1), past T when c >= tlim; tiles off the
        // diagonal and the sequence's end get limits no column reaches.
        const bool edge = qs < key0 + 15 || qs + FA_TILE > T;
        const int klim = edge ? key0 + g - qs - 2 * t : -FA_TILE;
        const int tlim = edge ? T - qs - 2 * t : FA_TILE;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const float2 l2 = *reinterpret_cast<const float2*>(tL + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = 8 * n + (e & 1);
                const float lse_q = (e & 1) ? l2.y : l2.x;
                st[n][e] = c < klim + 8 * (e >> 1) || c >= tlim
                               ? 0.0f : fa_exp2(fmaf(st[n][e], FA_SCALE_LOG2, -lse_q * FA_LOG2E));
            }
        }
        unsigned pf[4][4];
        fa_c_to_a(pf, st);
        fa_mma_tile(dv, pf, tdO, lane);  // dV += P^T dO

        float dpt[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
        fa_load_a(af, sV, 16 * warp, lane);
        fa_mma_tile_t(dpt, af, tdO, lane);  // dP^T = V dO^T
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const float2 d2 = *reinterpret_cast<const float2*>(tD + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++)
                dpt[n][e] = st[n][e] * (dpt[n][e] - ((e & 1) ? d2.y : d2.x));
        }
        fa_c_to_a(pf, dpt);
        fa_mma_tile(dk, pf, tQ, lane);  // dK += dS^T Q (scaled at the end)
    }

    __syncwarp();  // this warp's K and V rows are read (fragments) before they are overwritten
    fa_stage(fa_smem, dk, FA_SCALE, 16 * warp, lane);
    fa_stage(fa_smem + BC * 128, dv, 1.0f, 16 * warp, lane);
    __syncthreads();
    bf16* dk_dst = dqkv + ((long long)b * T + k0) * stride + C + h * FA_HS;
    fa_store_tile<BC, NT>(dk_dst, stride, k_end - k0, fa_smem);
    fa_store_tile<BC, NT>(dk_dst + C, stride, k_end - k0, fa_smem + BC * 128);
}

extern "C" __global__ void __launch_bounds__(128, 3)
flash_attention_backward_dq(bf16* __restrict__ dqkv, float* __restrict__ D,
                            const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
                            const bf16* __restrict__ out, const float* __restrict__ lse,
                            int B, int T, int NH) {
    flash_backward_dq<4>(dqkv, D, dout, qkv, out, lse, B, T, NH);
}

extern "C" __global__ void __launch_bounds__(128, 3)
flash_attention_backward_dkdv(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                              const bf16* __restrict__ qkv, const float* __restrict__ lse,
                              const float* __restrict__ D, int B, int T, int NH) {
    flash_backward_dkdv<4>(dqkv, dout, qkv, lse, D, B, T, NH);
}
