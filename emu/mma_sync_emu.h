// mma_sync_emu.h: the CPU emulator's ldmatrix, mma.sync and bf16 packing (kernels/mma_sync.cuh declares
// what each does, with the PTX ISA's fragment layouts).
//
// Each is collective, as on the device: the lanes put their operands (row addresses, fragment registers)
// into one exchange over the warp (emu::warp_allgather, fenced by warp barriers), and each lane then takes
// from all 32 exactly the elements the hardware's layout gives it. So an index that is right only in some
// other layout gives wrong results here as on the device. ldmatrix's preconditions are checked: every row
// address 16-byte aligned. The mma's products of bf16 values are exact in fp32 and its sums run in k order
// after the accumulator (the device's order inside one mma is unspecified: the tests' tolerances cover it).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda_bf16.h"
#include "cuda_emu.h"

namespace ddpm {
namespace emu_mma {
inline float bf16_value(uint16_t bits) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t element(const void* row, int i) {
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * i, sizeof v);
    return v;
}

inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
    if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) {
        std::fprintf(stderr, "CUDA emulator: ldmatrix with row address %p, not 16-byte aligned\n", row);
        std::abort();
    }
    const void* rows[32];
    emu::warp_allgather(&row, sizeof row, rows);
    const unsigned lane = emu::lane_id(), g = lane / 4, t = lane % 4;
    for (int q = 0; q < 4; ++q) {
        uint16_t lo, hi;
        if (trans) {  // column g of rows 2t and 2t + 1
            lo = element(rows[8 * q + 2 * t], g);
            hi = element(rows[8 * q + 2 * t + 1], g);
        } else {  // elements 2t and 2t + 1 of row g
            lo = element(rows[8 * q + g], 2 * t);
            hi = element(rows[8 * q + g], 2 * t + 1);
        }
        r[q] = uint32_t(lo) | uint32_t(hi) << 16;
    }
    emu::syncwarp();  // every lane has read the rows before any lane goes on to overwrite them
}
}  // namespace emu_mma

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu_mma::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emu_mma::ldmatrix(r, row, true); }

inline void mma_bf16_16816(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    struct Regs {
        uint32_t a[4], b[2];
    };
    Regs mine, all[32];
    std::memcpy(mine.a, a, sizeof mine.a);
    std::memcpy(mine.b, b, sizeof mine.b);
    emu::warp_allgather(&mine, sizeof mine, all);
    // The whole A (16 x 16) and B (16 x 8) from the lanes' registers, in the layout of mma_sync.cuh.
    float am[16][16], bm[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int half = 0; half < 2; ++half) {
            const int shift = 16 * half;
            am[g][2 * t + half] = emu_mma::bf16_value(uint16_t(all[l].a[0] >> shift));
            am[g + 8][2 * t + half] = emu_mma::bf16_value(uint16_t(all[l].a[1] >> shift));
            am[g][2 * t + 8 + half] = emu_mma::bf16_value(uint16_t(all[l].a[2] >> shift));
            am[g + 8][2 * t + 8 + half] = emu_mma::bf16_value(uint16_t(all[l].a[3] >> shift));
            bm[2 * t + half][g] = emu_mma::bf16_value(uint16_t(all[l].b[0] >> shift));
            bm[2 * t + 8 + half][g] = emu_mma::bf16_value(uint16_t(all[l].b[1] >> shift));
        }
    }
    const unsigned lane = emu::lane_id(), g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float s = acc[i];
        for (int k = 0; k < 16; ++k) s += am[row][k] * bm[k][col];
        acc[i] = s;
    }
}

inline uint32_t pack_bf16x2(float lo, float hi) {
    return uint32_t(__float2bfloat16_rn(lo).bits) | uint32_t(__float2bfloat16_rn(hi).bits) << 16;
}
}  // namespace ddpm
