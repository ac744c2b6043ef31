// The tanh GELU and its derivative, shared by kernels/gelu.cu and kernels/fp8.cu (which fuses
// the GELU into the fp8 cast of its output). Float in, float out.
#pragma once

#define GELU_K0 0.7978845608028654f  // sqrt(2/pi)
#define GELU_K1 0.044715f

__device__ __forceinline__ float gelu_fwd(float x) {
    float u = GELU_K0 * (x + GELU_K1 * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_bwd(float x, float dy) {
    float u = GELU_K0 * (x + GELU_K1 * x * x * x);
    float th = tanhf(u);
    float du = GELU_K0 * (1.0f + 3.0f * GELU_K1 * x * x);
    return dy * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
}
