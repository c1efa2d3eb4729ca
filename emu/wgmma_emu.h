// wgmma_emu.h: the CPU emulator's warpgroup MMA (kernels/wgmma.cuh says what each function does, with
// the PTX ISA's layouts).
//
// - Descriptors keep the device's fields: LBO and SBO are encoded and decoded at the device's bit
//   positions. Only the start address differs: the emulator's shared memory is ordinary host memory, so
//   the 14-bit start field holds an index into a table of the start pointers the kernels have named.
// - A wgmma is queued when issued and run when a wait_group lets it complete (commit_group closes a
//   group): its operands are read from shared memory then, as the hardware may, so a kernel that
//   overwrites an operand before waiting for the wgmma that reads it gets wrong results.
// - Each thread computes its own accumulator elements (thread 32 w + 4 g + t of the warpgroup: rows
//   16 w + g and + 8, columns 8 j + 2 t and + 1; from 0 where the wgmma does not accumulate), reading A
//   and B through the descriptors: K-major element
//   (mn, k) at byte 2 (8 (mn % 8) + k % 8) + LBO (k / 8) + SBO (mn / 8) from the start, MN-major at
//   2 (mn % 8 + 8 (k % 8)) + SBO (mn / 8) + LBO (k / 8). Products of bf16 values are exact in fp32; sums
//   run in k order after the accumulator.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_emu.h"
#include "tma_emu.h"

namespace ddpm {
namespace emu_wgmma {
struct Op {
    float* d;
    uint64_t a, b;
    int trans_a, trans_b, accumulate;
};
struct Thread {
    std::vector<std::vector<Op>> committed;  // oldest first
    std::vector<Op> open;
};

inline unsigned thread_id() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }

inline Thread& state() {
    static std::vector<Thread> threads(1024);
    return threads[thread_id()];
}

inline std::vector<const void*>& starts() {
    static std::vector<const void*> table;
    return table;
}

inline uint32_t start_index(const void* p) {
    auto& table = starts();
    for (uint32_t i = 0; i < table.size(); ++i)
        if (table[i] == p) return i;
    if (table.size() >= 0x4000) {
        std::fprintf(stderr, "CUDA emulator: more than 16384 distinct wgmma operand addresses\n");
        std::abort();
    }
    table.push_back(p);
    return uint32_t(table.size() - 1);
}

// The bf16 element (mn, k) of an operand described by `desc`.
inline float element(uint64_t desc, bool mn_major, int mn, int k) {
    const auto* start = static_cast<const unsigned char*>(starts().at(desc & 0x3FFF));
    const uint64_t lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    const uint64_t in_core = mn_major ? mn % 8 + 8 * (k % 8) : 8 * (mn % 8) + k % 8;
    const uint64_t at = 2 * in_core + lbo * (k / 8) + sbo * (mn / 8);
    uint16_t bits;
    std::memcpy(&bits, start + at, sizeof bits);
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline void run(const Op& op) {
    const unsigned t = thread_id() % 128, w = t / 32, g = (t % 32) / 4, q = t % 4;
    float a[2][16];  // this thread's two rows of A
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 16; ++k) a[h][k] = element(op.a, op.trans_a, int(16 * w + g + 8 * h), k);
    for (int j = 0; j < 16; ++j)
        for (int x = 0; x < 4; ++x) {
            const int col = 8 * j + 2 * int(q) + x % 2;
            float s = op.accumulate ? op.d[4 * j + x] : 0.0f;
            for (int k = 0; k < 16; ++k) s += a[x / 2][k] * element(op.b, op.trans_b, col, k);
            op.d[4 * j + x] = s;
        }
}
}  // namespace emu_wgmma

inline uint64_t smem_desc(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    if (reinterpret_cast<std::uintptr_t>(start) % 16 != 0) {
        std::fprintf(stderr, "CUDA emulator: wgmma operand at %p, not 16-byte aligned\n", start);
        std::abort();
    }
    return smem_desc_fields(emu_wgmma::start_index(start), lbo_bytes, sbo_bytes);
}

inline void wgmma_fence() {}
inline void fence_proxy_async() {}
inline void fence_operands(float (&)[64]) {}

namespace emu_wgmma {
// The bytes an operand of `rows` x 16 covers (its last element is its farthest: every term of the
// address grows with mn and k); no TMA copy may still be landing there for this thread.
inline void check_operand(uint64_t desc, bool mn_major, int rows) {
    const auto* start = static_cast<const unsigned char*>(starts().at(desc & 0x3FFF));
    const uint64_t lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    const int mn = rows - 1, k = 15;
    const uint64_t in_core = mn_major ? mn % 8 + 8 * (k % 8) : 8 * (mn % 8) + k % 8;
    const uint64_t last = 2 * in_core + lbo * (k / 8) + sbo * (mn / 8);
    emu_tma::check_read(start, start + last + 2);
}
}  // namespace emu_wgmma

template <int TA, int TB>
inline void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    emu_wgmma::check_operand(a, TA, 64);
    emu_wgmma::check_operand(b, TB, 128);
    emu_wgmma::state().open.push_back({d, a, b, TA, TB, accumulate});
}

inline void wgmma_commit() {
    auto& s = emu_wgmma::state();
    s.committed.push_back(std::move(s.open));
    s.open.clear();
}

// Runs the oldest committed groups until at most N remain.
template <int N>
inline void wgmma_wait() {
    auto& s = emu_wgmma::state();
    while (s.committed.size() > std::size_t(N)) {
        for (const auto& op : s.committed.front()) emu_wgmma::run(op);
        s.committed.erase(s.committed.begin());
    }
}
}  // namespace ddpm
