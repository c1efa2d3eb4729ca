// mma_sync.cuh: the warp-level tensor-core instructions of version 3 of the convolution ladder
// (gemm_mma.cuh), as three small functions over PTX, so the core reads as data movement and arithmetic.
//
//   ldmatrix_x4(r, row)        ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit
//                              elements from shared memory; lane 8 q + i gives the address of row i of
//                              matrix q (16 bytes, 16-byte aligned), and lane 4 g + t receives in r[q] the
//                              elements (g, 2t) and (g, 2t + 1) of matrix q, the first in the low half
//   ldmatrix_x4_trans(r, row)  the same with each matrix transposed: r[q] holds (2t, g) and (2t + 1, g)
//   mma_bf16_16816(acc, a, b)  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, acc += A B for a
//                              16 x 16 bf16 A and a 16 x 8 bf16 B, in fp32; lane 4 g + t holds
//                                a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..2t+1)
//                                a[2] = A(g, 2t+8..2t+9) a[3] = A(g+8, 2t+8..2t+9)
//                                b[0] = B(2t..2t+1, g)   b[1] = B(2t+8..2t+9, g)
//                                acc = C(g, 2t), C(g, 2t+1), C(g+8, 2t), C(g+8, 2t+1)
//   pack_bf16x2(lo, hi)        two floats rounded to bf16 (nearest even) in one 32-bit register, lo in
//                              the low half: the element order of every register above
//
// These are the PTX ISA's fragment layouts (sm_80 and newer). The CPU emulator implements the same
// functions from the same layouts (emu/mma_sync_emu.h), exchanging the lanes' registers the way the
// hardware does, so a kernel that gets a fragment index wrong gets wrong answers there too.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#if defined(__CUDACC__)

namespace ddpm {

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void mma_bf16_16816(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (the low half) = lo
    return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace ddpm

#else
#include "mma_sync_emu.h"
#endif
