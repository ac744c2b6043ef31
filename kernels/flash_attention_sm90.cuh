// wgmma machinery of causal flash attention on Hopper (sm_90a), shared by
// flash_attention_sm90.cu (forward) and flash_attention_sm90_bwd.cu (backward): shared-memory
// descriptors, the m64nNk16 bf16 products the kernels use, and the layouts they rely on. Only
// included under __CUDA_ARCH_FEAT_SM90_ALL. The shared tiles are those of
// flash_attention_tiles.cuh (64-element rows, 16-byte chunks XOR-swizzled by row % 8), aligned
// to 1024 bytes.
//
// Layouts relied on (PTX ISA, "Asynchronous Warpgroup Level Matrix" sections):
// - A shared tile of 64-element bf16 rows (128 bytes) is stored with 16-byte chunk c of row r at
//   chunk c ^ (r % 8) (fa_offset): with the tile 1024-byte aligned this is exactly the 128-byte
//   swizzle (address bits 4-6 ^= bits 7-9), whose atom is 8 rows x 128 bytes.
// - Descriptor (64 bits): [0,14) start address >> 4, [16,30) leading byte offset >> 4, [32,46)
//   stride byte offset >> 4, [49,52) base offset (0: atoms start on 1024-byte boundaries),
//   [62,64) swizzle mode, 1 = 128-byte.
// - K-major operand (Q as A, K as B of S = Q K^T: 64 head elements contiguous per row): SBO =
//   1024 (8-row group to the next), LBO unused for swizzled K-major (encoded 1); the k16 slice
//   kk starts at tile + 32 * kk (the hardware applies the swizzle to the final address).
// - MN-major operand (V as B of O = P V, imm-trans-b = 1: the 64 N elements contiguous per key):
//   canonical ((8,8,m),(8,k)) : ((1,8,LBO),(64,SBO)) in elements, so SBO = 1024 steps 8 keys;
//   LBO steps 64 N elements, unused at N = 64 (set to 1024 as well). Slice kk at tile + 2048 kk.
// - Accumulator D of m64nNk16, thread i of the warpgroup, w = i / 32, g = (i % 32) / 4,
//   t = i % 4: d[n][0..1] = D[16w + g][8n + 2t .. +1], d[n][2..3] = D[16w + g + 8][8n + 2t ..]:
//   per warp the m16n8 C fragments of mma.sync side by side (flash_attention.cuh).
// - A from registers (bf16, k16): per warp the mma.sync m16n8k16 A fragment of rows 16w..16w+15,
//   so as in the sm_80 kernel, the accumulators of 8-column groups 2kk and 2kk+1, packed to bf16,
//   are the A registers of k-slice kk: P never leaves registers.
// - wgmma reads shared memory through the async proxy: the cp.async (generic proxy) data is
//   made visible to it by fence.proxy.async after the copies complete and before the barrier.

#pragma once
#include "flash_attention.cuh"

// ---- PTX wrappers (sm_90a) ----
// Descriptors: the high word (SBO 1024, bit 62 = 128-byte swizzle) is fixed; the low word
// carries the start address >> 4 and the LBO. A product's k16 slices differ only in the start
// address, so the callers form a tile's low word once and add each slice's offset >> 4 to it
// (14-bit field: shared addresses stay below 256 KiB, so it never carries into the LBO).
constexpr unsigned FA9_DESC_HI = (1024u >> 4) | (1u << 30);
__device__ __forceinline__ unsigned fa9_desc_lo(unsigned addr, unsigned lbo) {
    return ((addr & 0x3FFFFu) >> 4) | ((lbo >> 4) << 16);
}
__device__ __forceinline__ unsigned long long fa9_desc(unsigned lo) {
    return (static_cast<unsigned long long>(FA9_DESC_HI) << 32) | lo;
}
__device__ __forceinline__ unsigned fa9_desc_lo_k(unsigned addr) {  // K-major
    return fa9_desc_lo(addr, 16);
}
__device__ __forceinline__ unsigned fa9_desc_lo_mn(unsigned addr) {  // MN-major
    return fa9_desc_lo(addr, 1024);
}
__device__ __forceinline__ void fa9_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fa9_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fa9_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Waits until at most one committed group (the latest) is still running.
__device__ __forceinline__ void fa9_wait_1() {
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}
// Completed cp.async writes (generic proxy) made visible to later wgmma reads (async proxy).
__device__ __forceinline__ void fa9_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// The top of every tile loop: this thread's cp.async copies have landed, they are made visible
// to the async proxy (wgmma), and the barrier makes every thread's visible to all, after which
// the buffer the previous tile used may be refilled.
__device__ __forceinline__ void fa9_tile_ready() {
    fa_cp_async_wait_all();
    fa9_fence_proxy_async();
    __syncthreads();
}
// Pins accumulator registers in program order around the asynchronous products: the compiler
// may not move their reads above a wait, or their writes below a wgmma.fence.
template <int N>
__device__ __forceinline__ void fa9_pin(float (&d)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
        asm volatile("" : "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3]) :: "memory");
}

#define FA9_F4(d, n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define FA9_F32(d) FA9_F4(d, 0), FA9_F4(d, 1), FA9_F4(d, 2), FA9_F4(d, 3), \
    FA9_F4(d, 4), FA9_F4(d, 5), FA9_F4(d, 6), FA9_F4(d, 7)
#define FA9_F32_HI(d) FA9_F4(d, 8), FA9_F4(d, 9), FA9_F4(d, 10), FA9_F4(d, 11), \
    FA9_F4(d, 12), FA9_F4(d, 13), FA9_F4(d, 14), FA9_F4(d, 15)
#define FA9_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FA9_D64 FA9_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, " \
    "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
    "%61, %62, %63"

// d (64 x 64) = (accumulate ? d : 0) + A (64 x 16, K-major smem) * B (16 x 64, K-major smem)
__device__ __forceinline__ void fa9_ss_n64(float (&d)[8][4], unsigned long long a,
                                           unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA9_D32 "}, "
                 "%32, %33, p, 1, 1, 0, 0;\n}\n"
                 : FA9_F32(d) : "l"(a), "l"(b), "r"(accumulate));
}
// d (64 x 128) = (accumulate ? d : 0) + A (64 x 16, K-major smem) * B (16 x 128, K-major smem)
__device__ __forceinline__ void fa9_ss_n128(float (&d)[16][4], unsigned long long a,
                                            unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA9_D64 "}, "
                 "%64, %65, p, 1, 1, 0, 0;\n}\n"
                 : FA9_F32(d), FA9_F32_HI(d) : "l"(a), "l"(b), "r"(accumulate));
}
// d (64 x 64) += A (64 x 16, bf16 fragments a) * B (16 x 64, MN-major smem)
__device__ __forceinline__ void fa9_rs_n64_mn(float (&d)[8][4], const unsigned (&a)[4],
                                              unsigned long long b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA9_D32 "}, "
                 "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FA9_F32(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
// ---- end of PTX wrappers ----

// Pins A fragments (bf16 pairs in registers) until here: placed after the wait of the products
// that read them, so their registers are not reused while an asynchronous product may still
// read them.
template <int K>
__device__ __forceinline__ void fa9_pin_a(unsigned (&a)[K][4]) {
#pragma unroll
    for (int k = 0; k < K; k++)
        asm volatile("" : "+r"(a[k][0]), "+r"(a[k][1]), "+r"(a[k][2]), "+r"(a[k][3]) :: "memory");
}

// Issue d (64 x 64) = A B^T over the 64 head elements (4 k16 slices, no commit, no wait): a is
// the shared address of 64 rows of A, b of a 64-row tile whose rows are the N index (both
// K-major, swizzled). The first slice overwrites d.
__device__ __forceinline__ void fa9_issue_abt(float (&d)[8][4], unsigned a, unsigned b) {
    const unsigned alo = fa9_desc_lo_k(a), blo = fa9_desc_lo_k(b);
#pragma unroll
    for (int kk = 0; kk < FA_HS / 16; kk++)  // slice kk: 32 bytes on
        fa9_ss_n64(d, fa9_desc(alo + 2 * kk), fa9_desc(blo + 2 * kk), kk);
}

// Issue d (64 x 64) += A B (4 k16 slices, no commit, no wait): a holds A (64 x 64) as bf16 A
// fragments (slice kk = columns 16kk..16kk+15), b is the shared address of a 64-row tile whose
// rows are the k index (MN-major, swizzled).
__device__ __forceinline__ void fa9_issue_ab(float (&d)[8][4], const unsigned (&a)[4][4],
                                             unsigned b) {
    const unsigned blo = fa9_desc_lo_mn(b);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) fa9_rs_n64_mn(d, a[kk], fa9_desc(blo + 128 * kk));  // 2048 B on
}
