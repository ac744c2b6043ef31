// Text generation with a KV cache: the pieces of one decode step that training has no use for.
//
//   decode_embed:      x[b] = wte[ids[b, pos[b]]] + wpe[pos[b]]                  x (B, C) `=`
//   gather_rows:       out[b] = inp[b * T + pos[b]]          the prompt's last position, (B, C)
//   kv_append:         cache[b, h, pos[b] + r] = k / v of qkv[b, r]  (prefill; rows past S dropped)
//   decode_attention:  cache[b, h, pos[b]] = k / v of qkv[b] (the newest token), then
//       out[b, h*HS + d] = sum_{u <= pos[b]} softmax_u(q_b . k_u / sqrt(HS)) v_u[d]
//
// ids (B, S) int32 holds every sequence's tokens (prompt, then generated); pos (B,) int32 is the
// position of the token a step feeds in, so the step attends to keys 0 .. pos[b]. The cache of
// one layer is (B, NH, S, HS) floatX for K and the same for V: one head's keys are contiguous.
// qkv rows are as in training, (B, R, 3C): q at [0, C), k at [C, 2C), v at [2C, 3C).
//
// The decode attention is split over the cached length ("flash decoding"): block (split, b*NH+h)
// takes keys [split * chunk, (split + 1) * chunk) and writes its unnormalized output and its
// (max, sum) in log2 units; the head's last block to finish rescales and adds the splits. So
// one sequence still spreads over many blocks, and the split count stays fixed for a given
// cache size, which a captured CUDA graph needs (blocks past pos[b] return at once).
// Every sum is in a fixed order: the step is bitwise deterministic.
#include "common.cuh"

#define DA_THREADS 128
#define DA_PACK (16 / (int)sizeof(floatX))

extern "C" __global__ void decode_embed(floatX* __restrict__ out, const int* __restrict__ ids,
                                        const int* __restrict__ pos,
                                        const floatX* __restrict__ wte,
                                        const floatX* __restrict__ wpe, int B, int C, int S) {
    const int packs = C / x128::size;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * packs) return;
    const int b = i / packs, c = (i % packs) * x128::size;
    const int p = pos[b];
    const int tok = max(ids[(long long)b * S + p], 0);  // -1 marks a failed draw (non-finite logits)
    const x128 e = load128(wte + (long long)tok * C + c);
    const x128 w = load128(wpe + (long long)p * C + c);
    x128 o;
#pragma unroll
    for (int k = 0; k < x128::size; k++) o[k] = from_float<floatX>(to_float(e[k]) + to_float(w[k]));
    store128(out + (long long)b * C + c, o);
}

extern "C" __global__ void gather_rows(floatX* __restrict__ out, const floatX* __restrict__ inp,
                                       const int* __restrict__ pos, int B, int T, int C) {
    const int packs = C / x128::size;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * packs) return;
    const int b = i / packs, c = (i % packs) * x128::size;
    store128(out + (long long)b * C + c, load128(inp + ((long long)b * T + pos[b]) * C + c));
}

extern "C" __global__ void kv_append(floatX* __restrict__ kcache, floatX* __restrict__ vcache,
                                     const floatX* __restrict__ qkv, const int* __restrict__ pos,
                                     int B, int R, int NH, int HS, int S) {
    const int C = NH * HS, packs = C / x128::size;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * R * packs) return;
    const int c = (int)(i % packs) * x128::size;
    const int r = (int)((i / packs) % R), b = (int)(i / ((long long)packs * R));
    const int p = pos[b] + r;
    if (p >= S) return;
    const int h = c / HS, d = c % HS;
    const floatX* row = qkv + ((long long)b * R + r) * 3 * C;
    const long long at = (((long long)b * NH + h) * S + p) * HS + d;
    store128(kcache + at, load128(row + C + c));
    store128(vcache + at, load128(row + 2 * C + c));
}

// Block (split, b*NH + h), DA_THREADS threads. tpk = HS / DA_PACK threads share one key (one
// 16-byte piece each, a power of two <= 32, checked by the launcher), so a warp reads whole
// cache rows. The newest key and value (position pos[b]) come from qkv itself: the block whose
// split holds that position writes them into the cache and reads them from qkv, so the append
// needs no launch of its own and no block reads a cache row another block is writing.
// Each block leaves part_o (B*NH, splits, HS) f32 = sum_u 2^(s_u - m) v_u and part_ml
// (B*NH, splits, 2) f32 = (m, sum_u 2^(s_u - m)), s = q . k * log2(e) / sqrt(HS); the last of a
// head's blocks to finish (a counter per head, reset by that block) adds the splits in order
// and writes out[b, h*HS + d]. Dynamic shared memory: chunk floats.
extern "C" __global__ void __launch_bounds__(DA_THREADS)
decode_attention(floatX* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                 int* __restrict__ counters, floatX* __restrict__ kcache,
                 floatX* __restrict__ vcache, const floatX* __restrict__ qkv,
                 const int* __restrict__ pos, int NH, int HS, int S, int chunk, float scale_log2) {
    extern __shared__ float score[];
    __shared__ float red[32];
    __shared__ float acc_sh[DA_THREADS * DA_PACK];
    __shared__ bool last_block;
    const int split = blockIdx.x, splits = gridDim.x, bh = blockIdx.y;
    const int b = bh / NH, h = bh % NH, C = NH * HS;
    const int p = pos[b], n = p + 1;
    const int k0 = split * chunk, k1 = min(k0 + chunk, n);
    if (k0 >= n) return;  // only the ceil(n / chunk) splits that hold keys take part
    const int used = (n + chunk - 1) / chunk;
    const int tpk = HS / DA_PACK, kpr = DA_THREADS / tpk;
    const int sub = threadIdx.x % tpk, kr = threadIdx.x / tpk;
    const long long head = (long long)bh * S * HS + sub * DA_PACK;
    const floatX* qrow = qkv + (long long)b * 3 * C + h * HS + sub * DA_PACK;
    const Packed128<floatX> knew = load128(qrow + C), vnew = load128(qrow + 2 * C);
    if (k1 == n && kr == 0) {  // this block holds the newest position
        store128(kcache + head + (long long)p * HS, knew);
        store128(vcache + head + (long long)p * HS, vnew);
    }

    float q[DA_PACK];
    {
        const Packed128<floatX> qp = load128(qrow);
#pragma unroll
        for (int i = 0; i < DA_PACK; i++) q[i] = to_float(qp[i]) * scale_log2;
    }
    // Scores: every thread runs the same rounds, so the shuffles see full warps.
    for (int base = k0; base < k1; base += kpr) {
        const int k = base + kr;
        float s = 0.0f;
        if (k < k1) {
            const Packed128<floatX> kp = k == p ? knew : load128(kcache + head + (long long)k * HS);
#pragma unroll
            for (int i = 0; i < DA_PACK; i++) s = fmaf(q[i], to_float(kp[i]), s);
        }
        for (int o = tpk / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (k < k1 && sub == 0) score[k - k0] = s;
    }
    __syncthreads();
    const int cnt = k1 - k0;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < cnt; i += DA_THREADS) mx = fmaxf(mx, score[i]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cnt; i += DA_THREADS) {
        const float e = exp2f(score[i] - mx);
        score[i] = e;
        sum += e;
    }
    sum = block_sum(sum, red);  // ends with a barrier after the writes above
    float acc[DA_PACK];
#pragma unroll
    for (int i = 0; i < DA_PACK; i++) acc[i] = 0.0f;
    for (int k = k0 + kr; k < k1; k += kpr) {
        const float e = score[k - k0];
        const Packed128<floatX> vp = k == p ? vnew : load128(vcache + head + (long long)k * HS);
#pragma unroll
        for (int i = 0; i < DA_PACK; i++) acc[i] = fmaf(e, to_float(vp[i]), acc[i]);
    }
#pragma unroll
    for (int i = 0; i < DA_PACK; i++) acc_sh[kr * HS + sub * DA_PACK + i] = acc[i];
    __syncthreads();
    const long long part = (long long)bh * splits + split;
    for (int d = threadIdx.x; d < HS; d += DA_THREADS) {
        float o = 0.0f;
        for (int r = 0; r < kpr; r++) o += acc_sh[r * HS + d];
        part_o[part * HS + d] = o;
    }
    if (threadIdx.x == 0) {
        part_ml[2 * part] = mx;
        part_ml[2 * part + 1] = sum;
    }
    // The last block of this head to get here combines: make this block's partials visible,
    // count it in, and let only the block that completes the count go on.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_block = atomicAdd(&counters[bh], 1) == used - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    const float* ml = part_ml + (long long)bh * splits * 2;
    float m = NEG_INF;
    for (int s = 0; s < used; s++) m = fmaxf(m, __ldcg(ml + 2 * s));
    float l = 0.0f;
    for (int s = 0; s < used; s++) l += __ldcg(ml + 2 * s + 1) * exp2f(__ldcg(ml + 2 * s) - m);
    const float inv = 1.0f / l;
    for (int d = threadIdx.x; d < HS; d += DA_THREADS) {
        float o = 0.0f;
        for (int s = 0; s < used; s++)
            o += __ldcg(part_o + ((long long)bh * splits + s) * HS + d) * exp2f(__ldcg(ml + 2 * s) - m);
        out[(long long)b * C + h * HS + d] = from_float<floatX>(o * inv);
    }
    if (threadIdx.x == 0) counters[bh] = 0;  // ready for the next step (and graph replay)
}
