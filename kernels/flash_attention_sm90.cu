// Causal flash attention, forward, for Hopper (sm_90a): the same math, inputs and outputs as
// flash_attention.cu (which stays the sm_80/sm_89 path), with the products on wgmma.
//
//   out[b, t, h*64 + d] = sum_{u <= t} softmax_u(q_t . k_u / 8) v_u[d]
//   lse[b, h, t]        = log sum_{u <= t} exp(q_t . k_u / 8)        (natural log, fp32)
// qkv (B, T, 3C) bf16; out (B, T, C) bf16 `=`; lse (B, NH, T) f32 `=`, read by the backward
// (flash_attention_bwd.cu) exactly as the sm_80 forward's.
//
// One block: NWG warpgroups (128 threads each) of 64 query rows, BR = 64 * NWG rows of one head.
// Q sits in shared memory for the whole block; K and V stream through two shared buffers of BC
// keys (cp.async by every thread, the next tile loading while this one is multiplied). Per tile
// and warpgroup: S (64 x BC, fp32 registers) = Q K^T by 4 wgmma m64nBCk16 with both operands
// in shared memory; masking and the online softmax on S in registers, as in the
// sm_80 kernel; P packed to bf16 in registers; O (64 x 64) += P V by BC/16 wgmma m64n64k16 with
// A = P from registers and B = V from shared memory. Warpgroups skip tiles whose keys all follow
// their rows, mask the tiles that cross their diagonal; keys past T are zero-filled and always
// masked. A 128-key tile whose upper 64 keys all follow the warpgroup's rows runs as a 64-key
// one (fa9_tile<64>: the masked half would only add zeros, so the result is the same bits).
// Fixed order everywhere: bitwise deterministic.
//
// The wgmma layouts and wrappers it relies on: flash_attention_sm90.cuh. The backward on
// sm_90a: flash_attention_sm90_bwd.cu.
#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "flash_attention_sm90.cuh"

// S (64 x BC) = Q K^T for this warpgroup: q and k are the shared addresses of its 64 Q rows and
// of the BC-key K tile. Waits for the result.
template <int BC>
__device__ __forceinline__ void fa9_scores(float (&s)[BC / 8][4], unsigned q, unsigned k) {
    const unsigned qlo = fa9_desc_lo_k(q), klo = fa9_desc_lo_k(k);
    fa9_pin(s);
    fa9_fence();
#pragma unroll
    for (int kk = 0; kk < FA_HS / 16; kk++) {  // slice kk: 32 bytes on
        if constexpr (BC == 128)
            fa9_ss_n128(s, fa9_desc(qlo + 2 * kk), fa9_desc(klo + 2 * kk), kk);
        else
            fa9_ss_n64(s, fa9_desc(qlo + 2 * kk), fa9_desc(klo + 2 * kk), kk);
    }
    fa9_commit();
    fa9_wait_all();
    fa9_pin(s);
}

// O (64 x 64) += P V: p holds P (64 x BC) as bf16 A fragments, v is the BC-key V tile.
template <int BC>
__device__ __forceinline__ void fa9_pv(float (&o)[8][4], const unsigned (&p)[BC / 16][4],
                                       unsigned v) {
    const unsigned vlo = fa9_desc_lo_mn(v);
    fa9_pin(o);
    fa9_fence();
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++) fa9_rs_n64_mn(o, p[kk], fa9_desc(vlo + 128 * kk));
    fa9_commit();
    fa9_wait_all();
    fa9_pin(o);
}

// One key tile of BC keys k0 .. k0 + BC - 1 for this warpgroup: S = Q K^T, the mask where the
// tile crosses this warp's diagonal (row0: the warp's first row), the online softmax update of
// the running max m and sum l (two rows a thread: row0 + g and row0 + g + 8) with O rescaled,
// and O += P V. q, k, v: shared addresses of the warpgroup's Q rows and the K and V tiles.
// Columns below 8 * N0 precede every row of the warpgroup: the mask skips them.
template <int BC, int N0 = 0>
__device__ __forceinline__ void fa9_tile(float (&o)[8][4], float (&m)[2], float (&l)[2],
                                         unsigned q, unsigned k, unsigned v, int k0, int row0,
                                         int g, int t) {
    constexpr int NS = BC / 8;
    float s[NS][4];
    fa9_scores<BC>(s, q, k);
    if (k0 + BC - 1 > row0)  // the tile crosses this warp's diagonal
        fa_mask_scores<NS, N0>(s, row0 + g - k0 - 2 * t);
    fa_softmax_tile<NS>(s, m, l, o);
    unsigned p[BC / 16][4];
    fa_c_to_a(p, s);
    fa9_pv<BC>(o, p, v);
}

template <int NWG, int BC>
__device__ __forceinline__ void fa9_forward(bf16* __restrict__ out, float* __restrict__ lse,
                                            const bf16* __restrict__ qkv, int B, int T, int NH) {
    static_assert(BC == 64 || BC == 128, "key tiles of 64 or 128");
    constexpr int BR = 64 * NWG, NT = 128 * NWG;
    constexpr unsigned KV_BYTES = (BC / FA_TILE) * FA_TILE_BYTES;  // BC rows of 128 bytes
    const FaTile tile = fa_query_tile(BR, T, NH);
    const int bh = tile.bh, q0 = tile.lo, q_end = tile.hi;
    const FaHead hd = fa_head(qkv, tile, T, NH);
    const int b = hd.b, h = hd.h, C = hd.C;
    const int n_kt = (q_end + BC - 1) / BC;  // key tiles holding keys < q_end

    const long long stride = hd.stride;
    const bf16 *q_src = hd.q, *k_src = hd.k, *v_src = hd.v;

    // shared: Q (BR rows; reused to stage the output), K[2], V[2] (BC rows each), all on
    // 1024-byte boundaries (the swizzle atom); the launcher adds 1024 bytes for the round-up.
    const unsigned raw = fa_smem_u32(fa_smem);
    const unsigned sQ = (raw + 1023u) & ~1023u;
    unsigned char* q_tile = fa_smem + (sQ - raw);
    const unsigned sK = sQ + BR * 128, sV = sK + 2 * KV_BYTES;

    fa_load_tile<BR, NT>(sQ, q_src + q0 * stride, stride, q_end - q0);
    fa_load_kv<BC, NT>(sK, sV, k_src, v_src, 0, stride, T);
    fa_cp_async_commit();

    const int wg = NWG == 1 ? 0 : threadIdx.x / 128, warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int wrow0 = q0 + 64 * wg;       // this warpgroup's rows: wrow0 .. wrow0 + 63
    const int row0 = wrow0 + 16 * warp;  // this warp's: row0 + g and row0 + g + 8
    const bool active = wrow0 < T;
    const unsigned sQw = sQ + wg * 64 * 128;
    float o[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    const unsigned chunk = fa_my_chunk();
    const bf16* kv_next = fa_my_row(k_src, stride) + BC * stride;  // tile 1, this thread's part
    for (int j = 0; j < n_kt; j++) {
        fa9_tile_ready();  // tile j visible to all; every warpgroup is done with tile j - 1
        if (j + 1 < n_kt) {
            const int k1 = (j + 1) * BC;
            const unsigned off = ((j + 1) & 1) * KV_BYTES;
            fa_load_kv_step<BC, NT>(sK + off, sV + off, kv_next, chunk, C, k_src, v_src, k1,
                                    stride, T);
            fa_cp_async_commit();
        }
        const int k0 = j * BC;
        // Uniform over the warpgroup (wgmma needs all 128 threads). Tile 0 is never skipped,
        // so every row has a finite max after it (key 0 <= row).
        if (!active || k0 > wrow0 + 63) continue;

        const unsigned tK = sK + (j & 1) * KV_BYTES, tV = sV + (j & 1) * KV_BYTES;
        if (BC == 128 && k0 + 64 > wrow0 + 63)  // keys k0 + 64 on follow every row: half a tile
            fa9_tile<64>(o, m, l, sQw, tK, tV, k0, row0, g, t);
        else if (BC == 128 && k0 + 64 == wrow0)  // the diagonal in keys k0 + 64 on: mask those
            fa9_tile<BC, 8>(o, m, l, sQw, tK, tV, k0, row0, g, t);
        else
            fa9_tile<BC>(o, m, l, sQw, tK, tV, k0, row0, g, t);
    }

    // Epilogue: O / l staged as bf16 in this warp's own rows of the Q tile (only its warpgroup
    // read them, and its products have completed), written out once every warp has staged.
    float inv[2];
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        inv[hh] = l[hh] > 0.0f ? 1.0f / l[hh] : 0.0f;  // 0 only in warpgroups past T
        const int row = row0 + g + 8 * hh;
        if (active && t == 0 && row < T)
            lse[(long long)bh * T + row] = (m[hh] * FA_SCALE_LOG2 + __log2f(l[hh])) / FA_LOG2E;
    }
    fa_stage_rows(q_tile, o, inv, 64 * wg + 16 * warp, lane);  // O / l
    __syncthreads();
    fa_store_tile<BR, NT>(out + ((long long)b * T + q0) * C + h * FA_HS, C, q_end - q0, q_tile);
}

// The entry points exist for every arch (one source), but only sm_90a has a body.
#define FA9_FORWARD(NWG, BC) fa9_forward<NWG, BC>(out, lse, qkv, B, T, NH)
#else
typedef __nv_bfloat16 bf16;
#define FA9_FORWARD(NWG, BC) __trap()  // never launched off sm_90a (the launcher checks)
#endif

// The kernel: one warpgroup, 128-key tiles (fa9_forward<1, 128>; the second launch bound is the
// blocks per SM its 168 registers allow). Measured on an H200 against the variants the
// benchmark removed (B=64, NH=12, T=1024): 0.349-0.353 ms, 2 warpgroups of 64-key tiles 0.364,
// 2 warpgroups of 128-key tiles capped at 128 registers spilled and hung in a check, the same
// kernel with the softmax overlapping the P V product 0.371 (bitwise equal, slower); later, one
// warpgroup of 64-key tiles at 4 blocks per SM no faster. With fewer instructions per tile
// (fixed-step loads, descriptors formed once a product, the mask's limits) 0.334 ms against
// cuDNN's 0.294-0.296 (docs/RESULTS.md, fifth part); with descriptors in uniform registers,
// half-width diagonal tiles and per-thread stepping source pointers, 129.4 M warp instructions
// (cuDNN's: 129.9 M) and 0.317 ms against cuDNN's 0.299 timed in alternation (sixth part).
// Shared memory per block: 8 KiB (Q) + 4 * 128 * BC (K and V, two buffers) + 1 KiB (alignment
// slack).
extern "C" __global__ void __launch_bounds__(128, 3)
flash_attention_forward_sm90_w1n128(bf16* __restrict__ out, float* __restrict__ lse,
                                    const bf16* __restrict__ qkv, int B, int T, int NH) {
    FA9_FORWARD(1, 128);
}
