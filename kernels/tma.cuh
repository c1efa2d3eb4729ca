// tma.cuh: Hopper's tensor-memory accelerator (TMA, sm_90) and the shared-memory barriers that say when
// its copies have landed, for version 5 of the convolution ladder (gemm_wgmma.cuh).
//
//   TensorMap                     the 128-byte tensor map the host encodes (cuTensorMapEncodeTiled) and
//                                 passes by value as a `const __grid_constant__` kernel parameter: a bf16
//                                 (or, for version 8's fp32 operands, fp32) tensor in global memory (address, extents, byte strides of each
//                                 dimension, innermost first) and the box one copy moves
//   tma_load_2d(dst, map, bar, x, y), tma_load_3d(.., z), tma_load_4d(dst, map, bar, x, y, z, w)
//                                 one thread queues the copy of the box whose first element is at those
//                                 coordinates (x innermost) into shared `dst`, densely, innermost
//                                 dimension fastest, with zeros where the box leaves the tensor; when the
//                                 bytes land they count against barrier `bar`'s expected transaction bytes
//   mbar_init(bar, arrivals)      a barrier whose phase completes after `arrivals` arrivals and all the
//                                 transaction bytes those arrivals announced
//   fence_mbar_init()             makes the initialisation visible to the TMA unit (the async proxy),
//                                 before the barrier that publishes it to the block
//   mbar_arrive_expect_tx(bar, n) arrives once, announcing n bytes still to land in this phase
//   mbar_arrive(bar)              arrives once (a consumer releasing a stage)
//   mbar_wait(bar, parity)        waits until the phase of that parity has completed (phases alternate
//                                 0, 1, 0, ...: use k of a barrier waits on parity k % 2)
//
// From the PTX ISA ("cp.async.bulk.tensor", "mbarrier", "Tensor-map"). The CPU emulator (emu/tma_emu.h)
// implements the same functions: its tensor map is its own encoding of the same fields (written by
// ddpm_emu_tensor_map), a copy's destination holds NaN until a thread waits on its barrier, a wgmma
// issued by a thread that has not waited for the copies into its operands stops the emulator, and so
// does a barrier that can never complete.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)

namespace ddpm {

struct alignas(64) TensorMap {
    uint64_t opaque[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// CUTLASS fences the initialisation with the first, the CUDA programming guide with the second; both
// cost one instruction per block.
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
    unsigned done = 0;
    while (!done)
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar))
        : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y, int z) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar))
        : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap* map, uint64_t* bar, int x, int y, int z,
                                            int w) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_addr(bar))
        : "memory");
}
#else
// Only sm_90a runs version 5 (it needs wgmma too); the launchers use its kernels only there.
__device__ __forceinline__ void mbar_init(uint64_t*, unsigned) { __trap(); }
__device__ __forceinline__ void fence_mbar_init() {}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t*, unsigned) {}
__device__ __forceinline__ void mbar_arrive(uint64_t*) {}
__device__ __forceinline__ void mbar_wait(uint64_t*, unsigned) {}
__device__ __forceinline__ void tma_load_2d(void*, const TensorMap*, uint64_t*, int, int) {}
__device__ __forceinline__ void tma_load_3d(void*, const TensorMap*, uint64_t*, int, int, int) {}
__device__ __forceinline__ void tma_load_4d(void*, const TensorMap*, uint64_t*, int, int, int, int) {}
#endif

}  // namespace ddpm

#else

#include "tma_emu.h"

#endif
