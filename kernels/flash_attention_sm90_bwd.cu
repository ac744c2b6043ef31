// Causal flash attention, backward, for Hopper (sm_90a): the same math, inputs and outputs as
// flash_attention_bwd.cu (which stays the path of every other device), with the products on
// wgmma (flash_attention_sm90.cuh). Works from either forward's out and lse.
//
// With P = exp(S - lse), S = q . k / 8:
//   D[t] = sum_d dout[t, d] out[t, d],   dP = dout v^T,   dS = P * (dP - D)
//   dq = dS k / 8,   dk = dS^T q / 8,   dv = P^T dout
// dqkv (B, T, 3C) bf16 `=`; dout, out (B, T, C) bf16; lse (B, NH, T) f32 from the forward;
// D (B, NH, T) f32 scratch, written by the first kernel and read by the second.
//
// Deterministic without atomics, the two kernels of the sm_80 backward, one warpgroup (64 rows)
// per block, 64-row tiles streamed through double-buffered shared memory (cp.async):
//  1. flash_attention_backward_dq_sm90 (64 queries, loops over key tiles): D for its rows, then
//     S = Q K^T and dP = dO V^T (both operands in shared memory, K-major), dS in registers,
//     dq += dS K (dS as A fragments from registers, K as an MN-major B).
//  2. flash_attention_backward_dkdv_sm90 (64 keys, loops over query tiles from its first key):
//     the transposed products, S^T = K Q^T and dP^T = V dO^T (shared, K-major), so P^T and dS^T
//     come out in the accumulator layout, which is the A-from-registers layout: dv += P^T dO and
//     dk += dS^T Q with dO and Q as MN-major B operands.
// No P or dS tile is ever written to shared memory: every operand layout is one the forward
// already uses (Q/K as K-major A/B, V as MN-major B), on tiles of the same format. All tiles are
// written only by cp.async and read by wgmma after fence.proxy.async and a barrier.
// Per tile, S and dP go out as two commit groups, P is formed while dP runs; in dk/dv, dv's
// product runs while dS^T is formed and dk's joins it before the tile's last wait. Register A
// fragments stay pinned until the wait that covers their products.
#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "flash_attention_sm90.cuh"

__device__ __forceinline__ void fa9_backward_dq(
        bf16* __restrict__ dqkv, float* __restrict__ D, const bf16* __restrict__ dout,
        const bf16* __restrict__ qkv, const bf16* __restrict__ out,
        const float* __restrict__ lse, int B, int T, int NH) {
    constexpr int BR = 64, NT = 128;
    const FaTile tile = fa_query_tile(BR, T, NH);
    const int bh = tile.bh, q0 = tile.lo, q_end = tile.hi;
    const FaHead hd = fa_head(qkv, tile, T, NH);
    const int b = hd.b, h = hd.h, C = hd.C;
    // Key tiles with keys < q_end; q0 is a multiple of 64, so each holds keys <= q0: none is
    // skipped (wgmma needs the whole warpgroup anyway), only the last one is masked.
    const int n_kt = (q_end + FA_TILE - 1) / FA_TILE;

    const long long stride = hd.stride;
    const bf16 *q_src = hd.q, *k_src = hd.k, *v_src = hd.v;
    const long long row_do = ((long long)b * T + q0) * C + h * FA_HS;  // row q0 of dout and out

    // shared, from a 1024-byte boundary (the swizzle atom; the launcher adds 1 KiB of slack):
    // Q (reused to stage dq), dO, K[2], V[2] (64 rows each), D (64 floats)
    const unsigned raw = fa_smem_u32(fa_smem);
    const unsigned sQ = (raw + 1023u) & ~1023u;
    unsigned char* base = fa_smem + (sQ - raw);
    const unsigned sdO = sQ + FA_TILE_BYTES, sK = sdO + FA_TILE_BYTES;
    const unsigned sV = sK + 2 * FA_TILE_BYTES;
    float* sD = reinterpret_cast<float*>(base + 6 * FA_TILE_BYTES);

    fa_load_tile<BR, NT>(sQ, q_src + q0 * stride, stride, q_end - q0);
    fa_load_tile<BR, NT>(sdO, dout + row_do, C, q_end - q0);
    fa_load_kv<FA_TILE, NT>(sK, sV, k_src, v_src, 0, stride, T);
    fa_cp_async_commit();

    // D for the block's rows straight from global while the tiles load
    fa_rowdot_D<BR, NT>(sD, D + (long long)bh * T, dout + row_do, out + row_do, C, q0, T);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = q0 + 16 * warp;  // this warp's accumulator rows: row0 + g, row0 + g + 8
    float lse2[2], dd[2];             // lse in log2 units and D of those rows
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int row = row0 + g + 8 * hh;
        lse2[hh] = row < T ? lse[(long long)bh * T + row] * FA_LOG2E : 0.0f;
    }
    float dq[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    const unsigned chunk = fa_my_chunk();
    const bf16* kv_next = fa_my_row(k_src, stride) + FA_TILE * stride;  // tile 1, this thread's
    for (int j = 0; j < n_kt; j++) {
        fa9_tile_ready();  // tile j and sD visible to all; tile j - 1's products have completed
        if (j + 1 < n_kt) {
            const int k1 = (j + 1) * FA_TILE;
            const unsigned off = ((j + 1) & 1) * FA_TILE_BYTES;
            fa_load_kv_step<FA_TILE, NT>(sK + off, sV + off, kv_next, chunk, C, k_src, v_src, k1,
                                         stride, T);
            fa_cp_async_commit();
        }
        if (j == 0) {
            dd[0] = sD[16 * warp + g];
            dd[1] = sD[16 * warp + g + 8];
        }
        const int k0 = j * FA_TILE;
        const unsigned tK = sK + (j & 1) * FA_TILE_BYTES, tV = sV + (j & 1) * FA_TILE_BYTES;

        float s[8][4], dp[8][4];
        fa9_pin(s);
        fa9_pin(dp);
        fa9_fence();
        fa9_issue_abt(s, sQ, tK);    // S = Q K^T
        fa9_commit();
        fa9_issue_abt(dp, sdO, tV);  // dP = dO V^T, running while P is formed
        fa9_commit();
        fa9_wait_1();
        fa9_pin(s);
        // Rows past T: zero Q and dO rows, lse 0 and D 0, so dS = P (0 - 0) = 0; never stored.
        if (k0 + FA_TILE - 1 > row0) {  // the tile crosses this warp's diagonal
            // key k0 + 8n + 2t + (e & 1) follows query row0 + g + 8 (e >> 1) when the tile
            // column 8n + (e & 1) (a constant) exceeds lim + 8 (e >> 1)
            const int lim = row0 + g - k0 - 2 * t;
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    s[n][e] = 8 * n + (e & 1) > lim + 8 * (e >> 1)
                                  ? 0.0f : fa_exp2(fmaf(s[n][e], FA_SCALE_LOG2, -lse2[e >> 1]));
        } else {
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    s[n][e] = fa_exp2(fmaf(s[n][e], FA_SCALE_LOG2, -lse2[e >> 1]));
        }
        fa9_wait_all();
        fa9_pin(dp);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] *= dp[n][e] - dd[e >> 1];  // dS = P (dP - D)
        unsigned dsf[4][4];
        fa_c_to_a(dsf, s);
        fa9_pin(dq);
        fa9_fence();
        fa9_issue_ab(dq, dsf, tK);  // dq += dS K
        fa9_commit();
        fa9_wait_all();
        fa9_pin(dq);
        fa9_pin_a(dsf);
    }

    __syncthreads();  // every warp's products (which read Q) have completed
    fa_stage(base, dq, FA_SCALE, 16 * warp, lane);
    __syncthreads();
    fa_store_tile<BR, NT>(dqkv + ((long long)b * T + q0) * stride + h * FA_HS, stride, q_end - q0,
                          base);
}

__device__ __forceinline__ void fa9_backward_dkdv(
        bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
        const bf16* __restrict__ qkv, const float* __restrict__ lse,
        const float* __restrict__ D, int B, int T, int NH) {
    constexpr int BC = 64, NT = 128;
    const FaTile tile = fa_key_tile(BC, T, NH);
    const int bh = tile.bh, k0 = tile.lo, k_end = tile.hi;
    const FaHead hd = fa_head(qkv, tile, T, NH);
    const int b = hd.b, h = hd.h, C = hd.C;
    // Query tiles from k0 (earlier queries precede every key); each holds a query >= k0 + 63 or
    // the last query, so none is skipped, and only the first and the last are masked.
    const int n_qt = (T - k0 + FA_TILE - 1) / FA_TILE;

    const long long stride = hd.stride;
    const bf16 *q_src = hd.q, *k_src = hd.k, *v_src = hd.v;
    const bf16* do_src = dout + (long long)b * T * C + h * FA_HS;
    const float* lse_src = lse + (long long)bh * T;
    const float* d_src = D + (long long)bh * T;

    // shared, from a 1024-byte boundary: K, V (reused to stage dk, dv), Q[2], dO[2] (64 rows
    // each), lse[2], D[2] (64 floats each)
    const unsigned raw = fa_smem_u32(fa_smem);
    const unsigned sK = (raw + 1023u) & ~1023u;
    unsigned char* base = fa_smem + (sK - raw);
    const unsigned sV = sK + FA_TILE_BYTES, sQ = sV + FA_TILE_BYTES;
    const unsigned sdO = sQ + 2 * FA_TILE_BYTES;
    const unsigned sL = sdO + 2 * FA_TILE_BYTES, sDD = sL + 2 * FA_TILE * 4;
    const float* fL = reinterpret_cast<const float*>(base + (sL - sK));
    const float* fD = reinterpret_cast<const float*>(base + (sDD - sK));

    fa_load_kv<BC, NT>(sK, sV, k_src, v_src, k0, stride, k_end);
    fa_load_tile<FA_TILE, NT>(sQ, q_src + k0 * stride, stride, T - k0);
    fa_load_tile<FA_TILE, NT>(sdO, do_src + (long long)k0 * C, C, T - k0);
    fa_load_row64_fill(sL, lse_src + k0, T - k0, __int_as_float(0x7f800000));  // +inf
    fa_load_row64(sDD, d_src + k0, T - k0);
    fa_cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int key0 = k0 + 16 * warp;  // this warp's accumulator rows: keys key0 + g, key0 + g + 8
    float dk[8][4], dv[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }

    // this thread's part of query tile 1 of Q and of dO, stepped a tile at a time
    const unsigned chunk = fa_my_chunk();
    const bf16* q_next = fa_my_row(q_src, stride) + (k0 + FA_TILE) * stride;
    const bf16* do_next = fa_my_row(do_src, C) + (long long)(k0 + FA_TILE) * C;
    for (int j = 0; j < n_qt; j++) {
        fa9_tile_ready();  // query tile j visible to all; tile j - 1's products have completed
        if (j + 1 < n_qt) {
            const int q1 = k0 + (j + 1) * FA_TILE, buf = (j + 1) & 1;
            const unsigned off = buf * FA_TILE_BYTES;
            if (T - q1 >= FA_TILE) {
                fa_load_rows<FA_TILE, NT>(sQ + off + chunk, q_next, stride);
                fa_load_rows<FA_TILE, NT>(sdO + off + chunk, do_next, C);
            } else {
                fa_load_tile<FA_TILE, NT>(sQ + off, q_src + q1 * stride, stride, T - q1);
                fa_load_tile<FA_TILE, NT>(sdO + off, do_src + (long long)q1 * C, C, T - q1);
            }
            q_next += FA_TILE * stride;
            do_next += FA_TILE * C;
            fa_load_row64_fill(sL + buf * FA_TILE * 4, lse_src + q1, T - q1,
                               __int_as_float(0x7f800000));  // +inf
            fa_load_row64(sDD + buf * FA_TILE * 4, d_src + q1, T - q1);
            fa_cp_async_commit();
        }
        const int qs = k0 + j * FA_TILE;  // first query of the tile
        const int buf = j & 1;
        const unsigned tQ = sQ + buf * FA_TILE_BYTES, tdO = sdO + buf * FA_TILE_BYTES;
        const float* tL = fL + buf * FA_TILE;
        const float* tD = fD + buf * FA_TILE;

        // transposed scores: rows = keys, columns = queries qs + 8n + 2t (+1)
        float st[8][4], dpt[8][4];
        fa9_pin(st);
        fa9_pin(dpt);
        fa9_fence();
        fa9_issue_abt(st, sK, tQ);    // S^T = K Q^T
        fa9_commit();
        fa9_issue_abt(dpt, sV, tdO);  // dP^T = V dO^T, running while P^T is formed
        fa9_commit();
        fa9_wait_1();
        fa9_pin(st);
        // Masked: a key after the query, or a query past T (its zero row would give P = 1).
        // Query qs + 8n + 2t + (e & 1), i.e. tile column c = 8n + (e & 1) (a constant), comes
        // before key key0 + g + 8 (e >> 1) when c < klim + 8 (e >> 1); off the diagonal klim is a
        // limit no column reaches (one loop either way: a second copy costs the registers the
        // products need). Queries past T need no mask: their lse reads +inf (fa_load_row64_fill)
        // and their S^T is 0 (zero Q rows), so P^T = 2^-inf = 0.
        const int klim = qs < key0 + 15 ? key0 + g - qs - 2 * t : -FA_TILE;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const float2 l2 = *reinterpret_cast<const float2*>(tL + 8 * n + 2 * t);
            // -lse in log2 units, once per query column (the two key rows share it)
            const float nl[2] = {-l2.x * FA_LOG2E, -l2.y * FA_LOG2E};
#pragma unroll
            for (int e = 0; e < 4; e++)
                st[n][e] = 8 * n + (e & 1) < klim + 8 * (e >> 1)
                               ? 0.0f : fa_exp2(fmaf(st[n][e], FA_SCALE_LOG2, nl[e & 1]));
        }
        unsigned pf[4][4], dsf[4][4];
        fa_c_to_a(pf, st);
        fa9_pin(dv);
        fa9_fence();
        fa9_issue_ab(dv, pf, tdO);  // dv += P^T dO, running while dS^T is formed
        fa9_commit();
        fa9_wait_1();  // dP^T (groups complete in order)
        fa9_pin(dpt);
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const float2 d2 = *reinterpret_cast<const float2*>(tD + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++)
                dpt[n][e] = st[n][e] * (dpt[n][e] - ((e & 1) ? d2.y : d2.x));
        }
        fa_c_to_a(dsf, dpt);
        fa9_pin(dk);
        fa9_fence();
        fa9_issue_ab(dk, dsf, tQ);  // dk += dS^T Q (scaled at the end)
        fa9_commit();
        fa9_wait_all();
        fa9_pin(dv);
        fa9_pin(dk);
        fa9_pin_a(pf);
        fa9_pin_a(dsf);
    }

    __syncthreads();  // every warp's products (which read K and V) have completed
    fa_stage(base, dk, FA_SCALE, 16 * warp, lane);
    fa_stage(base + FA_TILE_BYTES, dv, 1.0f, 16 * warp, lane);
    __syncthreads();
    bf16* dk_dst = dqkv + ((long long)b * T + k0) * stride + C + h * FA_HS;
    fa_store_tile<BC, NT>(dk_dst, stride, k_end - k0, base);
    fa_store_tile<BC, NT>(dk_dst + C, stride, k_end - k0, base + FA_TILE_BYTES);
}

// The entry points exist for every arch (one source), but only sm_90a has a body.
#define FA9_BWD_DQ() fa9_backward_dq(dqkv, D, dout, qkv, out, lse, B, T, NH)
#define FA9_BWD_DKDV() fa9_backward_dkdv(dqkv, dout, qkv, lse, D, B, T, NH)
#else
typedef __nv_bfloat16 bf16;
#define FA9_BWD_DQ() __trap()  // never launched off sm_90a (the launcher checks)
#define FA9_BWD_DKDV() __trap()
#endif

// Shared memory per block: 6 tiles of 64 rows (8 KiB each) + 64 floats (dq) or 256 (dk/dv),
// + 1 KiB alignment slack: 4 blocks fit an SM. Registers (ptxas 12.x): dq 128 with no spill at
// 4 blocks (16 warps) per SM; dk/dv holds four 64 x 64 fp32 tiles (dk, dv, S^T, dP^T), 168 at
// 3 blocks (8 bytes spilled; 191 without a bound).
extern "C" __global__ void __launch_bounds__(128, 4)
flash_attention_backward_dq_sm90(bf16* __restrict__ dqkv, float* __restrict__ D,
                                 const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
                                 const bf16* __restrict__ out, const float* __restrict__ lse,
                                 int B, int T, int NH) {
    FA9_BWD_DQ();
}

extern "C" __global__ void __launch_bounds__(128, 3)
flash_attention_backward_dkdv_sm90(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                   const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                   const float* __restrict__ D, int B, int T, int NH) {
    FA9_BWD_DKDV();
}
