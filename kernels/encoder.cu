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
     6 dwte_pieces      the sorted list in pieces of 32 entries, one block each: a token whose
                        bucket lies inside one piece gets its rows summed and added to dwte;
                        a bucket spanning pieces leaves one fp32 partial row per piece
     7 dwte_combine     adds the partial rows of each spanning bucket in piece order.
   Step 5 costs the bucket size per position: sum over v of count(v)^2 comparisons, cheap for
   text and still only milliseconds when every token is the same. Steps 6-7 bound the serial
   work of any block by 32 rows (pieces) or BT/32/8 partial rows (combine), so one frequent
   token does not leave a single SM summing thousands of rows.
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
    // a short serial loop per thread: unrolled so its loads are in flight together
    #pragma unroll 8
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
    #pragma unroll 8
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

// Pieces: the sorted list is cut into pieces of DWTE_PIECE consecutive entries (piece q holds
// sorted[q*P, (q+1)*P)), so a frequent token's long bucket is spread over many blocks. Inside a
// piece the entries form runs of one token each; warp w of the block sums runs w, w+W, ... (the
// rows of a run in sorted order, lanes over 128-bit column packs).
//   a run that is its token's whole bucket:        dwte[v] += sum, directly
//   a run that continues from the previous piece:  partial[q, 0, :] = sum   ("head")
//   a run that starts here and continues after:    partial[q, 1, :] = sum   ("tail")
// dwte_combine then adds, for each tail, the tail and the following heads in piece order.
// Every row of dwte is written by exactly one thread per column, and every sum has a fixed
// order: deterministic. Grid ceil(BT / P), block 32 * DWTE_WARPS.
#define DWTE_PIECE 32
#define DWTE_WARPS 4
extern "C" __global__ void dwte_pieces(floatX* dwte, float* partial, const floatX* dout, const int* sorted, const int* starts,
            const int* inp, int C, int Vp) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int q = blockIdx.x;
    const int p0 = q * DWTE_PIECE;
    const int total = starts[Vp];  // positions with a valid token (the grid assumes all are)
    if (p0 >= total) return;
    const int e = p0 + lane;
    const bool valid = e < total;
    const int pos = valid ? sorted[e] : 0;
    const int tok = valid ? inp[pos] : -1;
    const int prev = __shfl_up_sync(0xffffffffu, tok, 1);
    const unsigned int runs = __ballot_sync(0xffffffffu, valid && (lane == 0 || tok != prev));
    const int nvalid = __popc(__ballot_sync(0xffffffffu, valid));
    const int nruns = __popc(runs);
    for (int r = warp; r < nruns; r += DWTE_WARPS) {
        unsigned int m = runs;
        for (int i = 0; i < r; i++) m &= m - 1;  // drop the first r run starts
        const int j0 = __ffs(m) - 1;
        const unsigned int rest = m & (m - 1);
        const int j1 = rest ? __ffs(rest) - 1 : nvalid;
        const int v = __shfl_sync(0xffffffffu, tok, j0);
        const int b0 = starts[v], b1 = starts[v + 1];
        const bool head = b0 < p0;
        const bool tail = !head && b1 > p0 + DWTE_PIECE;
        for (int c0 = 0; c0 < C; c0 += 32 * x128::size) {
            const int c = c0 + lane * x128::size;
            float acc[x128::size];
            #pragma unroll
            for (int k = 0; k < x128::size; k++) acc[k] = 0.0f;
            #pragma unroll 4
            for (int j = j0; j < j1; j++) {
                const int row = __shfl_sync(0xffffffffu, pos, j);
                if (c < C) {
                    x128 d = load128(dout + (long long)row * C + c);
                    #pragma unroll
                    for (int k = 0; k < x128::size; k++) acc[k] += to_float(d[k]);
                }
            }
            if (c >= C) {
                // columns past C: nothing to write
            } else if (head || tail) {
                float* dst = partial + ((long long)q * 2 + (head ? 0 : 1)) * C + c;
                #pragma unroll
                for (int k = 0; k < x128::size; k += 4)
                    *reinterpret_cast<float4*>(dst + k) =
                        make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
            } else {
                floatX* dst = dwte + (long long)v * C + c;
                x128 old = load128(dst);
                #pragma unroll
                for (int k = 0; k < x128::size; k++)
                    old[k] = from_float<floatX>(to_float(old[k]) + acc[k]);
                store128(dst, old);
            }
        }
    }
}

// For the piece q whose last run is a tail (its token starts in q and goes on): dwte[v] +=
// partial[q, 1] + partial[q+1, 0] + ... + partial[q_end, 0], q_end the piece of the bucket's
// last entry. Contribution i goes to warp i % DWTE_COMBINE_WARPS, which adds its share in
// order; the warps' sums are then added in warp order. Grid (ceil(BT / P), ceil(C / 128)):
// blockIdx.y picks 128 columns, so a long bucket is combined by C/128 blocks at once.
// Block 32 * DWTE_COMBINE_WARPS.
#define DWTE_COMBINE_WARPS 8
extern "C" __global__ void __launch_bounds__(32 * DWTE_COMBINE_WARPS)
dwte_combine(floatX* dwte, const float* partial, const int* sorted, const int* starts,
             const int* inp, int C, int Vp) {
    __shared__ float4 part[DWTE_COMBINE_WARPS][32];
    const int q = blockIdx.x;
    const int p0 = q * DWTE_PIECE;
    const int total = starts[Vp];
    if (p0 >= total) return;
    const int last = min(p0 + DWTE_PIECE, total) - 1;
    const int v = inp[sorted[last]];
    const int b0 = starts[v], b1 = starts[v + 1];
    if (b0 < p0 || b1 <= p0 + DWTE_PIECE) return;  // not a tail: nothing to combine here
    const int n_contrib = 1 + (b1 - 1) / DWTE_PIECE - q;  // the tail, then one head per piece
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c = blockIdx.y * 128 + lane * 4;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (c < C) {
        #pragma unroll 4
        for (int i = warp; i < n_contrib; i += DWTE_COMBINE_WARPS) {
            const long long slot = i == 0 ? (long long)q * 2 + 1 : (long long)(q + i) * 2;
            float4 p = *reinterpret_cast<const float4*>(partial + slot * C + c);
            acc.x += p.x;
            acc.y += p.y;
            acc.z += p.z;
            acc.w += p.w;
        }
    }
    part[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && c < C) {
        float4 sum = part[0][lane];
        for (int w = 1; w < DWTE_COMBINE_WARPS; w++) {
            sum.x += part[w][lane].x;
            sum.y += part[w][lane].y;
            sum.z += part[w][lane].z;
            sum.w += part[w][lane].w;
        }
        floatX* dst = dwte + (long long)v * C + c;
        dst[0] = from_float<floatX>(to_float(dst[0]) + sum.x);
        dst[1] = from_float<floatX>(to_float(dst[1]) + sum.y);
        dst[2] = from_float<floatX>(to_float(dst[2]) + sum.z);
        dst[3] = from_float<floatX>(to_float(dst[3]) + sum.w);
    }
}
