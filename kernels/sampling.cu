// Choosing the next token on the GPU, so the host receives token ids, never logits.
//
//   greedy (temperature == 0): tok = argmax_v logits[b, v]        (the lowest id among ties)
//   else: z_v = logits[b, v] / temperature, over v < V;
//         top-k keeps z_v >= the k-th largest z (ties kept, as torch.topk's threshold);
//         top-p keeps the fewest largest z whose probability mass reaches top_p of what top-k
//         kept (the smallest key tau with mass(z >= tau) >= top_p * mass: a token is kept when
//         the mass strictly above it is still short of top_p);
//         tok ~ softmax over the kept z.
// Then ids[b, pos[b] + 1] = tok and pos[b] += 1.   logits (B, ld) floatX; ids (B, S) int32.
//
// One block of 1024 threads per row, no sort: both thresholds come from a radix select over
// order-preserving keys of the logits (16 bits for bf16, 32 for fp32: two or four passes of 8
// bits with per-warp shared-memory histograms, 64 KiB of dynamic shared memory),
// counting tokens for top-k and summing probability for top-p. Probabilities are fixed point,
// w_v = round(2^32 * 2^((z_v - max z) * log2 e)) in 64-bit integers, so every sum is exact and
// the choice is deterministic; a token more than 22 nats below the best (w = 0) is never drawn.
// The draw walks the kept weights in a fixed order (thread by thread, each over its own
// 16-byte packs of ids) to the point u * total, u uniform in [0, 1) from a hash of (seed, b, pos[b]):
// a fixed seed gives the same text every run, with no RNG state in memory.
#include "common.cuh"

#define SAMPLE_THREADS 1024
typedef unsigned long long u64;

// Order-preserving unsigned keys of the stored logits (z = logit / temperature has the same
// order): a bf16 logit's 16 bits give a 16-bit key, so the radix select needs two passes of 8
// bits instead of four.
__device__ __forceinline__ unsigned order_key(float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned order_key(__nv_bfloat16 x) {
    const unsigned u = __bfloat16_as_ushort(x);
    return (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
}
#define KEY_BITS (8 * (int)sizeof(floatX))

// f(v, z, key) for this thread's ids, z = logits[v] * zscale and key = order_key(logits[v]):
// 16-byte loads of the pack ids
// p = tid, tid + 1024, ..., each pack's ids in order (the fixed order every pass walks).
template <typename F>
__device__ __forceinline__ void for_my_logits(const floatX* row, int V, float zscale, F f) {
    const int packs = (V + x128::size - 1) / x128::size;
    for (int p = threadIdx.x; p < packs; p += SAMPLE_THREADS) {
        const x128 x = load128(row + p * x128::size);
#pragma unroll
        for (int e = 0; e < x128::size; e++) {
            const int v = p * x128::size + e;
            if (v < V) f(v, to_float(x[e]) * zscale, order_key(x[e]));
        }
    }
}

__device__ __forceinline__ u64 block_sum_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < SAMPLE_THREADS / 32 ? scratch[lane] : 0ull;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Warp 0 finds the bin d where the weight of the bins from 255 down reaches *rem: *sel = d and
// *rem -= the weight of the bins above d. Lane l sums bins 255 - 8l .. 248 - 8l, a warp scan
// finds the lane, which walks its eight.
__device__ __forceinline__ void select_bin(const u64* total, unsigned* shared_sel, u64* shared_rem) {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    const u64 rem = *shared_rem;
    u64 eight = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) eight += total[255 - 8 * lane - j];
    u64 incl = eight;
    for (int o = 1; o < 32; o <<= 1) {
        const u64 n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    const bool here = incl - eight < rem && incl >= rem;
    if (__ballot_sync(0xffffffffu, here) == 0u && lane == 0) *shared_sel = 0u;  // unreachable
    if (here) {
        u64 above = incl - eight;
        int sel = 248 - 8 * lane;
        for (int j = 0; j < 8; j++) {
            const int d = 255 - 8 * lane - j;
            if (above + total[d] >= rem) { sel = d; break; }
            above += total[d];
        }
        *shared_rem = rem - above;
        *shared_sel = (unsigned)sel;
    }
}

// The k-th largest of one key per thread (k <= SAMPLE_THREADS), by the same radix select.
__device__ unsigned block_kth_key(unsigned key, int k, unsigned* cnt, u64* total,
                                  unsigned* shared_sel, u64* shared_rem) {
    unsigned prefix = 0, mask = 0;
    if (threadIdx.x == 0) *shared_rem = (u64)k;
    for (int shift = KEY_BITS - 8; shift >= 0; shift -= 8) {
        if (threadIdx.x < 256) cnt[threadIdx.x] = 0u;
        __syncthreads();
        if ((key & mask) == prefix) atomicAdd(&cnt[(key >> shift) & 255u], 1u);
        __syncthreads();
        if (threadIdx.x < 256) total[threadIdx.x] = cnt[threadIdx.x];
        __syncthreads();
        select_bin(total, shared_sel, shared_rem);
        __syncthreads();
        prefix |= *shared_sel << shift;
        mask |= 255u << shift;
    }
    return prefix;
}

// The largest key tau with weight(keys >= tau) >= target, among tokens with key >= floor_key;
// weight = 1 per token (count) or its fixed-point probability. Each warp histograms into its own
// 256 bins (`hist`, 32 x 256 in dynamic shared memory), so warps never wait on each other's bins.
__device__ unsigned radix_select(const floatX* row, int V, float zscale, float zmax, bool count,
                                 unsigned floor_key, u64 target, u64* hist, u64* total,
                                 unsigned* shared_sel, u64* shared_rem) {
    unsigned prefix = 0, mask = 0;
    u64* mine = hist + (threadIdx.x / 32) * 256;
    const int lane = threadIdx.x % 32, packs = (V + x128::size - 1) / x128::size;
    if (threadIdx.x == 0) *shared_rem = target;
    for (int shift = KEY_BITS - 8; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 32 * 256; i += SAMPLE_THREADS) hist[i] = 0ull;
        __syncthreads();
        // The keys of one row share their top bits, so a warp's lanes mostly hit one bin: then
        // the warp adds its weights with warp reductions and one lane does the atomic. Every
        // lane runs the same trips, as the warp-wide intrinsics need.
        for (int base = 0; base < packs; base += SAMPLE_THREADS) {
            const int p = base + threadIdx.x;
            x128 x;
#pragma unroll
            for (int e = 0; e < x128::size; e++) x[e] = from_float<floatX>(0.0f);
            if (p < packs) x = load128(row + p * x128::size);
#pragma unroll
            for (int e = 0; e < x128::size; e++) {
                const float z = to_float(x[e]) * zscale;
                const unsigned key = order_key(x[e]), bin = (key >> shift) & 255u;
                bool take = p < packs && p * x128::size + e < V && key >= floor_key &&
                            (key & mask) == prefix;
                const u64 w = !take ? 0ull : count ? 1ull
                                                   : (u64)llrintf(exp2f(z - zmax) * 4294967296.0f);
                take = take && w != 0ull;
                const unsigned active = __ballot_sync(0xffffffffu, take);
                if (active == 0u) continue;
                const int leader = __ffs(active) - 1;
                const unsigned lbin = __shfl_sync(0xffffffffu, bin, leader);
                if (__all_sync(0xffffffffu, !take || bin == lbin)) {
                    // one bin for the whole warp (the usual case): one atomic; weights up to
                    // 2^32 are added as 16-bit parts so the 32-bit warp sums cannot overflow
                    u64 sum = __popc(active);
                    if (!count) {
                        const unsigned all = 0xffffffffu;
                        const unsigned lo = __reduce_add_sync(all, (unsigned)(w & 0xffffu));
                        const unsigned mid = __reduce_add_sync(all, (unsigned)((w >> 16) & 0xffffu));
                        const unsigned hi = __reduce_add_sync(all, (unsigned)(w >> 32));
                        sum = (u64)lo + ((u64)mid << 16) + ((u64)hi << 32);
                    }
                    if (lane == leader) atomicAdd(&mine[lbin], sum);
                } else if (take) {
                    atomicAdd(&mine[bin], w);
                }
            }
        }
        __syncthreads();
        if (threadIdx.x < 256) {
            u64 t = 0;
            for (int w = 0; w < SAMPLE_THREADS / 32; w++) t += hist[w * 256 + threadIdx.x];
            total[threadIdx.x] = t;
        }
        __syncthreads();
        select_bin(total, shared_sel, shared_rem);
        __syncthreads();
        prefix |= *shared_sel << shift;
        mask |= 255u << shift;
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(int* __restrict__ ids, int* __restrict__ pos, const floatX* __restrict__ logits,
            int ld, int V, int S, float temperature, int top_k, float top_p, unsigned seed) {
    extern __shared__ u64 hist[];  // SAMPLE_THREADS / 32 warps x 256 bins
    __shared__ u64 total[256];
    __shared__ unsigned cnt[256];
    __shared__ u64 red[32];
    __shared__ float fred[32];
    __shared__ unsigned sel;
    __shared__ u64 rem;
    __shared__ int pick;
    const int b = blockIdx.x;
    const floatX* row = logits + (long long)b * ld;
    const int p = pos[b];

    if (temperature <= 0.0f) {  // greedy: (value, id) maxima, lowest id among equal values
        float best = NEG_INF;
        int arg = 0x7fffffff;
        for_my_logits(row, V, 1.0f, [&](int v, float z, unsigned) {
            if (z > best || (z == best && v < arg)) { best = z; arg = v; }
        });
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
        }
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        if (lane == 0) { fred[warp] = best; reinterpret_cast<int*>(red)[warp] = arg; }
        __syncthreads();
        if (threadIdx.x == 0) {
            float bb = fred[0];
            int ba = reinterpret_cast<int*>(red)[0];
            for (int w = 1; w < SAMPLE_THREADS / 32; w++) {
                const float ob = fred[w];
                const int oa = reinterpret_cast<int*>(red)[w];
                if (ob > bb || (ob == bb && oa < ba)) { bb = ob; ba = oa; }
            }
            ids[(long long)b * S + p + 1] = ba;
            pos[b] = p + 1;
        }
        return;
    }

    const float zscale = 1.4426950408889634f / temperature;  // z in log2 units
    float zmax = NEG_INF;
    unsigned kmax = 0u;  // this thread's largest key
    for_my_logits(row, V, zscale, [&](int, float z, unsigned key) {
        zmax = fmaxf(zmax, z);
        kmax = max(kmax, key);
    });
    zmax = block_max(zmax, fred);

    unsigned floor_key = 0;
    if (top_k > 0 && top_k < V) {
        // The k largest of the threads' maxima are k different logits, so the k-th largest
        // logit is at least their k-th largest: a floor that leaves the select few candidates.
        if (top_k <= SAMPLE_THREADS)
            floor_key = block_kth_key(kmax, top_k, cnt, total, &sel, &rem);
        floor_key = radix_select(row, V, zscale, zmax, true, floor_key, (u64)top_k, hist, total,
                                 &sel, &rem);
    }
    if (top_p < 1.0f) {
        u64 mass = 0;
        for_my_logits(row, V, zscale, [&](int, float z, unsigned key) {
            if (key >= floor_key) mass += (u64)llrintf(exp2f(z - zmax) * 4294967296.0f);
        });
        mass = block_sum_u64(mass, red);
        const u64 target = (u64)ceil((double)top_p * (double)mass);
        floor_key = radix_select(row, V, zscale, zmax, false, floor_key, target > 0 ? target : 1ull,
                                 hist, total, &sel, &rem);
    }

    // Kept mass per thread over its ids v = tid, tid + 1024, ...; an exclusive scan over threads.
    u64 mine = 0;
    for_my_logits(row, V, zscale, [&](int, float z, unsigned key) {
        if (key >= floor_key) mine += (u64)llrintf(exp2f(z - zmax) * 4294967296.0f);
    });
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    u64 incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
        const u64 n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) red[warp] = incl;
    if (threadIdx.x == 0) pick = -1;
    __syncthreads();
    u64 before = incl - mine, kept = 0;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) {
        if (w < warp) before += red[w];
        kept += red[w];
    }
    const unsigned h1 = hash_u32((unsigned)p, seed ^ hash_u32((unsigned)b, 0x9E3779B9u));
    const unsigned h2 = hash_u32((unsigned)p + 0x51ED2701u, h1);
    const double u = (double)((((u64)h1) << 21) ^ (u64)h2) * (1.0 / 9007199254740992.0);  // [0, 1)
    u64 target = (u64)(u * (double)kept);
    if (target >= kept) target = kept - 1;  // kept >= 1: the best token always has w = 2^32
    if (mine > 0 && target >= before && target < before + mine) {
        u64 c = before;
        bool found = false;
        for_my_logits(row, V, zscale, [&](int v, float z, unsigned key) {
            if (found || key < floor_key) return;
            c += (u64)llrintf(exp2f(z - zmax) * 4294967296.0f);
            if (c > target) { pick = v; found = true; }
        });
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ids[(long long)b * S + p + 1] = pick;
        pos[b] = p + 1;
    }
}
