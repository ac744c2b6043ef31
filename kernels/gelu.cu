/* GELU, tanh approximation (GPT-2's MLP nonlinearity).

   forward:  out = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
   backward: dinp = dout * (0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) du/dx),
             du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

   Shapes: any, flattened to n elements (the MLP hidden activation is (B, T, 4C)).
   Saved for backward: the input x (the model keeps the pre-activation fch).
   Gradients: dinp is written (=), not accumulated; dinp may alias dout (in-place backward).

   Each thread moves 128-bit packs (two in the forward, one in the backward); a pack that runs
   past n takes the scalar path, so n need not be a multiple of the pack. Pointers must be
   16-byte aligned.
*/
#include "common.cuh"
#include "gelu.cuh"

__device__ __forceinline__ void gelu_forward_pack(floatX* out, const x128& x) {
    x128 y;
    #pragma unroll
    for (int k = 0; k < x128::size; k++) y[k] = from_float<floatX>(gelu_fwd(to_float(x[k])));
    store128(out, y);
}

// Forward: each thread moves GELU_FWD_PACKS packs, blockDim.x packs apart (each load instruction
// of a warp stays coalesced), their loads issued together: with one pack a thread, too few bytes
// are in flight per SM to cover the memory latency. The input is read once here (the backward
// rereads it much later): it streams past L2.
#define GELU_FWD_PACKS 2
extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long long n) {
    constexpr int P = GELU_FWD_PACKS, S = x128::size;
    const long long i0 = ((long long)blockIdx.x * blockDim.x * P + threadIdx.x) * S;
    const long long step = (long long)blockDim.x * S;
    if (i0 + (P - 1) * step + S <= n) {
        x128 x[P];
        #pragma unroll
        for (int p = 0; p < P; p++) x[p] = load128cs(inp + i0 + p * step);
        #pragma unroll
        for (int p = 0; p < P; p++) gelu_forward_pack(out + i0 + p * step, x[p]);
        return;
    }
    for (int p = 0; p < P; p++) {  // the tail: whole packs, then single elements
        const long long i = i0 + p * step;
        if (i + S <= n) {
            gelu_forward_pack(out + i, load128cs(inp + i));
        } else {
            for (long long j = i; j < n; j++)
                out[j] = from_float<floatX>(gelu_fwd(to_float(inp[j])));
        }
    }
}

// No __restrict__: dinp and dout may be the same buffer (each element is read before written,
// by the same thread).
extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout,
                                         long long n) {
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= n) return;
    if (i + x128::size <= n) {
        x128 x = load128cs(inp + i);
        x128 dy = load128cs(dout + i);
        x128 dx;
        #pragma unroll
        for (int k = 0; k < x128::size; k++)
            dx[k] = from_float<floatX>(gelu_bwd(to_float(x[k]), to_float(dy[k])));
        store128(dinp + i, dx);
    } else {
        for (long long j = i; j < n; j++)
            dinp[j] = from_float<floatX>(gelu_bwd(to_float(inp[j]), to_float(dout[j])));
    }
}
