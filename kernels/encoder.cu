/* Encoder: token embedding plus position embedding.

   forward:  out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]
   backward: dwte[v,:] += sum over (b,t) with inp[b,t] == v of dout[b,t,:]
             dwpe[t,:] += sum over b of dout[b,t,:]

   Shapes: inp int32 (B,T), wte (Vp,C), wpe (maxT,C), out/dout (B,T,C); C a multiple of the
   128-bit pack (8 bf16 / 4 fp32). Saved for backward: inp. Gradients accumulate (+=).

   Determinism: no float atomics. dwpe sums the B rows of each t in order b = 0..B-1. dwte
   works on a stable counting sort of the token positions built with integer atomics only
   (whose results do not depend on order):
     1 bucket_clear     counts[v] = 0
     2 bucket_count     counts[v] = #positions holding token v
     3 bucket_scan      starts = exclusive prefix sum of counts (one block)
     4 bucket_scatter   each position lands somewhere in its token's bucket (order arbitrary)
     5 bucket_rank      each position finds its rank among the bucket's positions, so
                        sorted[] lists every bucket in increasing position order
     6 dwte_backward    one block per token sums its bucket's dout rows in that order.
   Step 5 costs the bucket size per position: sum over v of count(v)^2 comparisons, cheap for
   text (a few times N) and still only milliseconds when every token is the same.
*/
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// forward: one thread per 128-bit pack of out

extern "C" __global__ void encoder_forward(floatX* out, const int* inp, const floatX* wte,
                                           const floatX* wpe, int BT, int T, int C, int Vp) {
    const int packs = C / x128::size;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)BT * packs) return;
    const int bt = (int)(idx / packs);
    const int c = (int)(idx % packs) * x128::size;
    const int t = bt % T;
    const int tok = inp[bt];
    x128 r;
    if (tok < 0 || tok >= Vp) {
        // An out-of-range id would read outside wte: make the row NaN so the loss shows it.
        #pragma unroll
        for (int k = 0; k < x128::size; k++) r[k] = from_float<floatX>(__int_as_float(0x7fc00000));
    } else {
        x128 e = load128(wte + (long long)tok * C + c);
        x128 p = load128(wpe + (long long)t * C + c);
        #pragma unroll
        for (int k = 0; k < x128::size; k++)
            r[k] = from_float<floatX>(to_float(e[k]) + to_float(p[k]));
    }
    store128(out + (long long)bt * C + c, r);
}

// ---------------------------------------------------------------------------------------------
// backward, dwpe: one thread per (t, pack), summing over b in order

extern "C" __global__ void dwpe_backward(floatX* dwpe, const floatX* dout, int B, int T, int C) {
    const int packs = C / x128::size;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T * packs) return;
    const int t = idx / packs;
    const int c = (idx % packs) * x128::size;
    float acc[x128::size];
    #pragma unroll
    for (int k = 0; k < x128::size; k++) acc[k] = 0.0f;
    const long long row_stride = (long long)T * C;
    const floatX* src = dout + (long long)t * C + c;
    #pragma unroll 4
    for (int b = 0; b < B; b++) {
        x128 d = load128cs(src + b * row_stride);
        #pragma unroll
        for (int k = 0; k < x128::size; k++) acc[k] += to_float(d[k]);
    }
    floatX* dst = dwpe + (long long)t * C + c;
    x128 old = load128(dst);
    #pragma unroll
    for (int k = 0; k < x128::size; k++) old[k] = from_float<floatX>(to_float(old[k]) + acc[k]);
    store128(dst, old);
}

// ---------------------------------------------------------------------------------------------
// backward, dwte: stable bucketing of positions by token (integer work only)

extern "C" __global__ void bucket_clear(int* counts, int Vp) {
    int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v < Vp) counts[v] = 0;
}

extern "C" __global__ void bucket_count(int* counts, const int* inp, int BT, int Vp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= BT) return;
    int tok = inp[i];
    if (tok >= 0 && tok < Vp) atomicAdd(&counts[tok], 1);
}

// starts[v] = sum of counts[0..v), starts[Vp] = total. One block of blockDim threads (a multiple
// of 32, at most 1024), each scanning a contiguous segment.
extern "C" __global__ void bucket_scan(int* starts, const int* counts, int Vp) {
    __shared__ int warp_tot[32];
    const int per = (Vp + blockDim.x - 1) / blockDim.x;
    const int lo = min(threadIdx.x * per, Vp), hi = min(lo + per, Vp);
    int sum = 0;
    for (int v = lo; v < hi; v++) sum += counts[v];
    // exclusive scan of the per-thread sums: within the warp, then across warp totals
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / 32;
        int w = lane < nw ? warp_tot[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        warp_tot[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    int run = incl - sum + (warp > 0 ? warp_tot[warp - 1] : 0);
    for (int v = lo; v < hi; v++) {
        starts[v] = run;
        run += counts[v];
    }
    if (threadIdx.x == blockDim.x - 1) starts[Vp] = warp_tot[blockDim.x / 32 - 1];
}

// counts[] comes back to zero here (each position takes one slot by decrementing its count).
extern "C" __global__ void bucket_scatter(int* bucket, int* counts, const int* starts,
                                          const int* inp, int BT, int Vp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= BT) return;
    int tok = inp[i];
    if (tok < 0 || tok >= Vp) return;
    int slot = starts[tok] + atomicSub(&counts[tok], 1) - 1;
    bucket[slot] = i;
}

// sorted[start(tok) + #(bucket entries < i)] = i: positions ascending within each bucket.
extern "C" __global__ void bucket_rank(int* sorted, const int* bucket, const int* starts,
                                       const int* inp, int BT, int Vp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= BT) return;
    int tok = inp[i];
    if (tok < 0 || tok >= Vp) return;
    const int s = starts[tok], e = starts[tok + 1];
    int rank = 0;
    for (int j = s; j < e; j++) rank += bucket[j] < i;
    sorted[s + rank] = i;
}

// One block per token v (grid Vp), blockDim = 32 * DWTE_WARPS. Warp w sums the bucket rows
// w, w + W, w + 2W, ... in order, each lane owning one pack of a 32-pack column chunk; the W
// warp partials are then added in warp order through shared memory. The row-to-warp mapping
// depends only on the bucket, so the result is the same every run.
#define DWTE_WARPS 8
extern "C" __global__ void __launch_bounds__(32 * DWTE_WARPS)
dwte_backward(floatX* dwte, const floatX* dout, const int* sorted, const int* starts, int C) {
    __shared__ float part[DWTE_WARPS][32 * x128::size];
    const int v = blockIdx.x;
    const int s = starts[v], e = starts[v + 1];
    if (s == e) return;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int c0 = 0; c0 < C; c0 += 32 * x128::size) {
        const int c = c0 + lane * x128::size;
        float acc[x128::size];
        #pragma unroll
        for (int k = 0; k < x128::size; k++) acc[k] = 0.0f;
        if (c < C) {
            #pragma unroll 4
            for (int j = s + warp; j < e; j += DWTE_WARPS) {
                x128 d = load128(dout + (long long)sorted[j] * C + c);
                #pragma unroll
                for (int k = 0; k < x128::size; k++) acc[k] += to_float(d[k]);
            }
        }
        #pragma unroll
        for (int k = 0; k < x128::size; k++) part[warp][lane * x128::size + k] = acc[k];
        __syncthreads();
        // 32 * size columns, summed over warps in order by the first threads of the block
        for (int col = threadIdx.x; col < 32 * x128::size; col += blockDim.x) {
            const int cc = c0 + col;
            if (cc < C) {
                float sum = 0.0f;
                #pragma unroll
                for (int w = 0; w < DWTE_WARPS; w++) sum += part[w][col];
                floatX* dst = dwte + (long long)v * C + cc;
                *dst = from_float<floatX>(to_float(*dst) + sum);
            }
        }
        __syncthreads();
    }
}
