// wgmma.cuh: the Hopper warpgroup MMA (sm_90a) of version 4 of the convolution ladder (gemm_wgmma.cuh),
// as small functions over PTX, with the shared-memory matrix descriptor it reads its operands through.
//
//   smem_desc(start, lbo, sbo)      a descriptor of a bf16 operand in shared memory, no swizzle: bits 0-13
//                                   the start address, 16-29 the leading and 32-45 the stride byte
//                                   offsets, each (x & 0x3FFFF) >> 4; swizzle mode (bits 62-63) and base
//                                   offset (49-51) 0. Which offset is which depends on the operand's
//                                   major-ness, in units of 8 x 8 "core matrices" of 128 contiguous bytes:
//                                     K-major  (element (mn, k) at 8 (mn % 8) + k % 8 in its core): LBO =
//                                              the step from k 0-7 to k 8-15, SBO = from mn 0-7 to 8-15
//                                     MN-major (element (mn, k) at mn % 8 + 8 (k % 8), transposed with
//                                              imm-trans 1): SBO = the step from mn 0-7 to 8-15, LBO = from
//                                              k 0-7 to 8-15
//   smem_desc_sw128(start, lbo, sbo) the same in the 128-byte swizzle (mode 1; ladder version 8,
//                                   gemm_hopper.cuh): rows of 128 bytes, the 16-byte chunk index (address
//                                   bits 4-6) XORed with bits 7-9 (Swizzle<3,4,3>, TMA's
//                                   CU_TENSOR_MAP_SWIZZLE_128B), the pattern repeating every 1024 bytes:
//                                     K-major  element (mn, k) at byte 2 k + 128 (mn % 8) + SBO (mn / 8),
//                                              k < 64 (a wgmma's 16 k 32 bytes into the row per step)
//                                     MN-major element (mn, k) at byte 2 (mn % 64) + 128 (k % 8) +
//                                              LBO (mn / 64) + SBO (k / 8)
//   smem_desc_sw64(start, lbo, sbo) the same in the 64-byte swizzle (mode 2 in bits 62-63): the operand is
//                                   rows of 64 bytes, laid out as below, then each element's address has
//                                   its bits 4-5 (the 16-byte chunk within the row) XORed with its bits
//                                   7-8 (CUTLASS's Swizzle<2,4,3>, the pattern TMA's
//                                   CU_TENSOR_MAP_SWIZZLE_64B writes); the pattern repeats every 512 bytes,
//                                   and the operand's 8-row groups start 512-byte aligned. From the PTX
//                                   ISA's canonical layouts (T = 8 bf16 = 16 bytes):
//                                     K-major  ((8,m),(T,2k)):((4T,SBO),(1,T)): element (mn, k) at byte
//                                              2 k + 64 (mn % 8) + SBO (mn / 8), a wgmma's 16 k within one
//                                              row (the start steps 32 bytes for k 16-31); LBO unused, set
//                                              to 16 bytes as CUTLASS does
//                                     MN-major ((T,4,m),(8,k)):((1,T,LBO),(4T,SBO)): element (mn, k) at
//                                              byte 2 (mn % 32) + 64 (k % 8) + LBO (mn / 32) + SBO (k / 8):
//                                              rows along k of 32 mn, LBO between 32-wide column groups
//   wgmma_m64n128k16<TA, TB>(d, a, b, acc)
//                                   wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16: d = A B (+ d when
//                                   acc) over the 128 threads of a warpgroup, A 64 x 16 and B 16 x 128 from
//                                   shared memory (TA, TB: 1 for MN-major). Thread 32 w + 4 g + t of the group
//                                   holds d[4 j + x] = D(16 w + g + 8 (x / 2), 8 j + 2 t + x % 2)
//   wgmma_fence, wgmma_commit, wgmma_wait<N>   wgmma.fence (before the first wgmma that touches the
//                                   accumulators), commit_group, wait_group N (at most N groups left in
//                                   flight: only then may their shared memory be overwritten or their
//                                   accumulators read)
//   fence_proxy_async              fence.proxy.async.shared::cta: makes the thread's ordinary stores to
//                                   shared memory visible to the wgmma that read it (before the barrier)
//   fence_operands(d)              keeps the compiler from moving reads of d above a wait
//   setmaxnreg_dec<N>, setmaxnreg_inc<N>   a warpgroup's registers per thread lowered or raised to N
//   wgmma_ss_m64nNk16, wgmma_rs_m64nNk16   N = 128 or 256, A from shared memory or registers
//                                   (wgmma_ops.cuh, generated)
//
// From the PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate", "Matrix Descriptor
// Format", "Shared Memory Matrix Layout"). The CPU emulator (emu/wgmma_emu.h) implements the same
// functions from the same layouts, decoding the same descriptor fields, and runs a wgmma when it is waited
// for, not when it is issued, so a kernel that overwrites an operand too early reads wrong data there too.
#pragma once

#include <cstdint>

namespace ddpm {

// The descriptor from its fields; `start` is the encoded start address.
__device__ __forceinline__ uint64_t smem_desc_fields(uint32_t start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return uint64_t(start & 0x3FFFu) | uint64_t((lbo_bytes & 0x3FFFFu) >> 4) << 16 |
           uint64_t((sbo_bytes & 0x3FFFFu) >> 4) << 32;
}

// The swizzle mode field (bits 62-63): 0 none, 1 128-byte, 2 64-byte, 3 32-byte.
constexpr uint64_t SMEM_DESC_SWIZZLE_64B = uint64_t(2) << 62;
constexpr uint64_t SMEM_DESC_SWIZZLE_128B = uint64_t(1) << 62;

}  // namespace ddpm

#if defined(__CUDACC__)

namespace ddpm {

__device__ __forceinline__ uint64_t smem_desc(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(start));
    return smem_desc_fields((addr & 0x3FFFFu) >> 4, lbo_bytes, sbo_bytes);
}

__device__ __forceinline__ uint64_t smem_desc_sw64(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return smem_desc(start, lbo_bytes, sbo_bytes) | SMEM_DESC_SWIZZLE_64B;
}

__device__ __forceinline__ uint64_t smem_desc_sw128(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return smem_desc(start, lbo_bytes, sbo_bytes) | SMEM_DESC_SWIZZLE_128B;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// setmaxnreg: a warpgroup gives registers back (producer) or takes them (consumers); the kernel must
// start with a register cap (__launch_bounds__(threads, 1)).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %68, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, %66, %67;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "n"(TA), "n"(TB), "r"(accumulate));  // scale-d: D = A B + (accumulate ? D : 0)
}
#else
// Only sm_90a has wgmma; the launchers run the kernels that use it only there.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {}
__device__ __forceinline__ void wgmma_fence() { __trap(); }
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async() {}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&)[64], uint64_t, uint64_t, int) {}
#endif

template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

}  // namespace ddpm

#include "wgmma_ops.cuh"

#else
#include "wgmma_emu.h"
#endif
