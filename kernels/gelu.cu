/* GELU, tanh approximation (GPT-2's MLP nonlinearity).

   forward:  out = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
   backward: dinp = dout * (0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) du/dx),
             du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

   Shapes: any, flattened to n elements (the MLP hidden activation is (B, T, 4C)).
   Saved for backward: the input x (the model keeps the pre-activation fch).
   Gradients: dinp is written (=), not accumulated; dinp may alias dout (in-place backward).

   Each thread moves one 128-bit pack; a thread whose pack runs past n takes the scalar path,
   so n need not be a multiple of the pack. Pointers must be 16-byte aligned.
*/
#include "common.cuh"
#include "gelu.cuh"

extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long long n) {
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= n) return;
    if (i + x128::size <= n) {
        // The input is read once here (backward rereads it much later): stream it past L2.
        x128 x = load128cs(inp + i);
        x128 y;
        #pragma unroll
        for (int k = 0; k < x128::size; k++) y[k] = from_float<floatX>(gelu_fwd(to_float(x[k])));
        store128(out + i, y);
    } else {
        for (long long j = i; j < n; j++) out[j] = from_float<floatX>(gelu_fwd(to_float(inp[j])));
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
